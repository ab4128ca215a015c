"""The ``rrcompile`` command line.

Every user error is one line on stderr naming the culprit, exit code 2, and no file changed: each
command plans its outputs with :func:`rrcompile.io.outputs` before any work (a new command does the
same) and they replace their targets together at the very end.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx

from rrcompile import pipeline
from rrcompile.calibrate import (
    CalibratedEvaluator, CalibrationConfig, Calibrator, SimulatedChip, calibrated_sigma_sweep, load_measurements,
    save_measurements,
)
from rrcompile.compensation_training import CompensationConfig
from rrcompile.compensation import candidates
from rrcompile.data import Dataset, Preprocess, data_files, fit_to_input, load_data
from rrcompile.deploy import compiled_device, deploy
from rrcompile.crossbar import ADC_IMAGES, adc_range_shapes, needs_adc_ranges, untile, with_adc_ranges
from rrcompile.devices import DeviceConfig, device_file, parse_device, simulated_device
from rrcompile.errors import DeviceSpecError, OptionError, RRCompileError, UnsupportedModelError
from rrcompile.evaluate import BATCH_SIZE, ChipStats, MonteCarloEvaluator, plot_sigma_sweep, sigma_sweep
from rrcompile.executor import ChipExecutor, chip_executor
from rrcompile.finetune import FinetuneConfig, finetune
from rrcompile.graph import (
    RRCOMPILE_DOMAIN, analog_layers, default_opset, macs_per_sample, model_io, set_library_logging, tensor_shapes,
)
from rrcompile.hardware import DEFAULT_TILE, HardwareReport
from rrcompile.io import load_model, outputs, save_model
from rrcompile.lipschitz import FORMS, LipschitzPenalty
from rrcompile.passes.insert_variation import InsertVariationPass
from rrcompile.passes.strip_simulation import StripSimulationPass
from rrcompile.rl.selection import SearchResult
from rrcompile.report import format_table, percent, write_json
from rrcompile.torch_graph import DEVICE_TYPES, default_device


DEFAULT_DEVICE = "lognormal:sigma=0.5"
DEFAULT_DATA = "digits"  # embedded in scikit-learn: every command runs without a download
CHIPS = 100  # simulated chips of evaluate and of compile's report
COMPILE_SWEEP = "0,0.2,...,0.8"  # compile's sigma sweep by default (its own sigma is added from the table)
SWEEP_CHIPS = 10  # chips per sigma of compile's sweep: a point of its plot, not the table's statistics
MAX_SWEEP_POINTS = 1000  # each point is a full Monte Carlo run; more is a typo, not a plan
NO_ANALOG_LAYER = "no analog layer (Conv, Gemm or MatMul with a constant weight) in the model"
KNOWN_DOMAINS = ("", "ai.onnx", RRCOMPILE_DOMAIN)


@contextlib.contextmanager
def about(path: str) -> Iterator[None]:
    """Prefix errors raised inside with ``path`` so the user knows which file they concern."""
    try:
        yield
    except RRCompileError as exc:
        if str(path) in str(exc):
            raise
        raise type(exc)(f"{path}: {exc}") from exc


def parse_sweep(text: str) -> list[float]:
    """``0,0.1,0.2`` or the elided form ``0,0.1,...,0.8`` (step taken from the first two values)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        if "..." in parts:
            if len(parts) != 4 or parts[2] != "...":
                raise ValueError
            start, second, stop = float(parts[0]), float(parts[1]), float(parts[3])
            step = second - start
            if step <= 0 or stop < start:
                raise ValueError
            count = int(round((stop - start) / step)) + 1
            if count > MAX_SWEEP_POINTS:
                raise DeviceSpecError(f"--sigma-sweep '{text}': {count} points, at most {MAX_SWEEP_POINTS}")
            values = [round(start + i * step, 10) for i in range(count)]
        else:
            values = [float(p) for p in parts]
    except (ValueError, OverflowError):
        raise DeviceSpecError(f"--sigma-sweep '{text}': expected a comma list like 0,0.1,0.2 or 0,0.1,...,0.8") from None
    if not values or min(values) < 0 or not all(math.isfinite(v) for v in values):
        raise DeviceSpecError(f"--sigma-sweep '{text}': sigmas must be finite and >= 0")
    if len(values) > MAX_SWEEP_POINTS:
        raise DeviceSpecError(f"--sigma-sweep '{text}': {len(values)} points, at most {MAX_SWEEP_POINTS}")
    return values


def load_for_evaluation(path: str, device_spec: str | None) -> tuple[onnx.ModelProto, DeviceConfig]:
    """The model to evaluate and its device: a simulation graph (``compile --simulate-output``)
    brings its own, read back from its variation ops; any other model takes ``--device``, by
    default the device a deployed graph was compiled for, else the default device. A deployed
    graph that keeps its tiles and ADCs is evaluated on the layers as written (the device
    simulates the crossbar), with the ADC ranges it stores where they fit the device's tiles."""
    model = load_model(path)
    embedded = simulated_device(model)
    if embedded is None or HardwareReport.from_model(model) is not None:
        recorded = compiled_device(model)  # a deployed graph: the device it was compiled for
        stored = embedded.adc_ranges if embedded is not None else {}
        untile(model)  # before canonicalizing, which would fold the tiled weight into a constant
        model = pipeline.canonicalize(model)
        device = parse_device(device_spec) if device_spec else recorded or parse_device(DEFAULT_DEVICE)
        check_model_for_data(model)
        device.check_patterns(analog_layers(model))
        if stored and adc_range_shapes(model, device) == {layer: r.shape for layer, r in stored.items()}:
            device = dataclasses.replace(device, adc_ranges=stored)
        return model, device
    if device_spec is not None:
        raise DeviceSpecError("the model is a simulation graph with its own device; drop --device")
    model = StripSimulationPass()(model).model
    check_model_for_data(model)
    return model, embedded


def check_model_for_data(model: onnx.ModelProto) -> None:
    """Refuse, in one line, a canonical model that the evaluator or the trainer cannot feed or run."""
    if not analog_layers(model):
        raise UnsupportedModelError(NO_ANALOG_LAYER)
    local = {f.domain for f in model.functions}
    for node in model.graph.node:
        if node.domain not in KNOWN_DOMAINS and node.domain not in local:
            raise UnsupportedModelError(f"node '{node.name}' ({node.domain}:{node.op_type}): op not supported "
                                        f"(custom domain '{node.domain}' is unknown to onnxruntime and rrcompile)")
    name, _ = model_io(model)
    (value,) = [i for i in model.graph.input if i.name == name]
    elem_type = value.type.tensor_type.elem_type
    if elem_type != onnx.TensorProto.FLOAT:
        raise UnsupportedModelError(f"input '{name}' is {onnx.TensorProto.DataType.Name(elem_type).lower()}: rrcompile "
                                    f"feeds float32 data (export the model with a float input)")


def check_labels(data: Dataset, model: onnx.ModelProto) -> None:
    """Labels must be classes of the model, or every accuracy silently counts them as misses."""
    dims = model.graph.output[0].type.tensor_type.shape.dim[1:]
    classes = math.prod(d.dim_value for d in dims) if dims and all(d.HasField("dim_value") for d in dims) else None
    data.check_labels(classes)


def input_files(args: argparse.Namespace, *device_specs: str | None) -> list[str]:
    """Every file a command reads, none of which an output may replace."""
    files = [args.model, *(device_file(spec) for spec in device_specs if spec)]
    if getattr(args, "data", None):
        files += data_files(args.data)
    return files


def stats_table(columns: dict[str, ChipStats]) -> str:
    """The accuracy metrics, one column per set of chips (uncalibrated, calibrated, ...)."""
    metrics = [("clean", lambda s: s.clean_accuracy), ("chips: mean", lambda s: s.mean), ("chips: std", lambda s: s.std),
               ("chips: 5th percentile", lambda s: s.p5), ("chips: worst", lambda s: s.worst),
               ("yield (>= 95% of clean)", lambda s: s.yield_)]
    return format_table(["metric", *columns], [[name, *(percent(get(s)) for s in columns.values())] for name, get in metrics])


def calibration_images(args: argparse.Namespace, count: int, preprocess: Preprocess, evaluator: MonteCarloEvaluator):
    """The first ``count`` unlabeled training images of ``--data``, prepared for the model."""
    train = load_data(args.data, "train").subset(count)
    return evaluator.prepare(preprocess.apply(train.x), train.name)


def adc_images(args: argparse.Namespace, model: onnx.ModelProto, device: DeviceConfig,
               preprocess: Preprocess) -> np.ndarray | None:
    """The training images that fix the ADC ranges of a device with an ``adc`` term (else None)."""
    if not needs_adc_ranges(device):
        return None
    train = load_data(args.data, "train").subset(ADC_IMAGES)
    return fit_to_input(preprocess.apply(train.x), *model_io(model), data_name=train.name)


def sweep_table(results: dict[float, ChipStats]) -> str:
    return format_table(["sigma", "mean", "std", "5th pct", "worst", "yield"], [
        [f"{s:g}", percent(r.mean), percent(r.std), percent(r.p5), percent(r.worst), percent(r.yield_)]
        for s, r in results.items()])


def cmd_evaluate(args: argparse.Namespace) -> int:
    sweep = parse_sweep(args.sigma_sweep) if args.sigma_sweep else None
    preprocess = Preprocess.parse(args.scale, args.mean, args.std)
    if args.device is not None:
        parse_device(args.device)  # a bad spec is reported before the model is read
    plot_path = (args.plot or f"{Path(args.model).stem}.sigma.png") if sweep else None
    check_scale(args)
    planned = {"--json": args.json, "--plot": plot_path}
    with outputs(input_files(args, args.device), planned) as out, contextlib.ExitStack() as scope:
        with about(args.model):
            model, device = load_for_evaluation(args.model, args.device)
            x_adc = adc_images(args, model, device, preprocess)
            evaluator = MonteCarloEvaluator(model, device, batch_size=args.batch_size, adc_images=x_adc,
                                            device_type=args.device_type)
            # refuses a model without slots
            calibrator = Calibrator(model, device_type=args.device_type) if args.calibrate else None
        data = load_data(args.data, args.split).subset(args.limit)
        check_labels(data, model)
        x = evaluator.prepare(preprocess.apply(data.x), data.name)
        x_calibration = calibration_images(args, args.calibrate, preprocess, evaluator) if calibrator else None
        # Ray, if asked for, starts once the inputs are known to be good
        executor = scope.enter_context(chip_executor(args.workers, args.ray_address))

        started = time.perf_counter()
        if calibrator:
            stats, calibrated = CalibratedEvaluator(model, device, x_calibration, batch_size=args.batch_size,
                                                    device_type=args.device_type).evaluate(
                x, data.y, args.samples, args.seed, progress=args.progress, executor=executor)
        else:
            stats = evaluator.evaluate(x, data.y, args.samples, args.seed, progress=args.progress, executor=executor)
        elapsed = time.perf_counter() - started
        print(f"{args.model} on {data.name} ({len(data.y)} {args.split} images), device {device.describe()}, "
              f"{args.samples} chips, seed {args.seed}"
              + (f", each calibrated on {len(x_calibration)} unlabeled train images" if calibrator else ""))
        print(stats_table({"uncalibrated": stats, "calibrated": calibrated} if calibrator else {"accuracy": stats}))
        print(f"{args.samples * len(data.y) / elapsed:,.0f} images x chips per second"
              + (" (calibration included, each chip evaluated twice)" if calibrator else ""))
        report = {
            "model": str(args.model), "data": data.name, "split": args.split, "images": len(data.y),
            "preprocess": {"scale": preprocess.scale, "mean": list(preprocess.mean), "std": list(preprocess.std)},
            "device": device.describe(), "samples": args.samples, "seed": args.seed, "batch_size": args.batch_size,
            **stats.summary(), "chip_accuracies": stats.chip_accuracies,
        }
        if calibrator:
            report["calibrated"] = {**calibrated.summary(), "chip_accuracies": calibrated.chip_accuracies,
                                    "calibration_images": len(x_calibration)}

        if sweep:
            if calibrator:
                results, calibrated_results = calibrated_sigma_sweep(
                    model, device, sweep, x_calibration, x, data.y, args.samples, args.seed, progress=args.progress,
                    executor=executor, device_type=args.device_type)
            else:
                results = sigma_sweep(model, device, sweep, x, data.y, args.samples, args.seed,
                                      batch_size=args.batch_size, progress=args.progress, adc_images=x_adc,
                                      executor=executor, device_type=args.device_type)
            print("\naccuracy vs log-normal sigma" + (", uncalibrated" if calibrator else ""))
            print(sweep_table(results))
            report["sigma_sweep"] = [{"sigma": s, **r.summary()} for s, r in results.items()]
            curves = {Path(args.model).stem: results}
            if calibrator:
                print("\naccuracy vs log-normal sigma, calibrated")
                print(sweep_table(calibrated_results))
                report["calibrated"]["sigma_sweep"] = [{"sigma": s, **r.summary()} for s, r in calibrated_results.items()]
                curves[f"{Path(args.model).stem} + calibrated"] = calibrated_results
            plot_sigma_sweep(curves, out["--plot"], f"{Path(args.model).name} on {data.name}")
            print(f"plot: {plot_path}")
        if args.json:
            write_json(report, out["--json"])
            print(f"report: {args.json}")
    return 0


def parse_chip(text: str) -> tuple[int, int]:
    """``SEED:INDEX``: chip ``INDEX`` of the Monte Carlo run ``SEED``."""
    seed, colon, index = text.partition(":")
    if not colon or not seed.strip().isdigit() or not index.strip().isdigit():
        raise OptionError(f"--chip {text!r}: expected SEED:INDEX, two integers >= 0 (e.g. 0:3)")
    return int(seed), int(index)


def cmd_calibrate(args: argparse.Namespace) -> int:
    chip_id = parse_chip(args.chip) if args.chip else None
    if args.dump_measurements and chip_id is None:
        raise OptionError("--dump-measurements records a simulated chip: give --chip")
    if args.device is not None:
        parse_device(args.device)
    default_device(args.device_type)  # cuda without a GPU is refused before any work
    preprocess = Preprocess.parse(args.scale, args.mean, args.std)
    planned = {"-o": args.output, "--json": args.json, "--dump-measurements": args.dump_measurements}
    with outputs([*input_files(args, args.device), args.measured], planned) as out:
        with about(args.model):
            model, device = load_for_evaluation(args.model, args.device)
            # measured in one pass, the layers saw the uncalibrated chip's inputs: match W x on them
            calibrator = Calibrator(model, CalibrationConfig(target="layer") if args.single_pass else CalibrationConfig(),
                                    device_type=args.device_type)
            evaluator = MonteCarloEvaluator(model, device, device_type=args.device_type)
        if chip_id is not None:
            x_calibration = calibration_images(args, args.images, preprocess, evaluator)
            chip = SimulatedChip(model, device, *chip_id, varied=evaluator.varied_model)
            started = time.perf_counter()
            if args.single_pass:  # as a bring-up without the compiler in the loop would: measure, then solve
                calibration = calibrator.calibrate_measured(calibrator.calibrate(chip, x_calibration, solve_slots=False)
                                                            .measurements, f"chip {args.chip}")
            else:
                calibration = calibrator.calibrate(chip, x_calibration)
            source = f"chip {chip_id[1]} of seed {chip_id[0]}, simulated ({device.describe()}), " \
                     f"on {len(x_calibration)} unlabeled train images"
        else:
            with about(args.measured):
                measurements = load_measurements(args.measured)
                started = time.perf_counter()
                calibration = calibrator.calibrate_measured(measurements, str(args.measured))
            source = f"measurements {args.measured} ({len(calibration.measurements['images'])} images)"
        seconds = time.perf_counter() - started
        chip_graph = calibration.apply(model)
        if device.crossbar:  # hardware-ready like the deployed graph: its tiles and ADCs kept
            chip_graph = redeploy(chip_graph, (HardwareReport.from_model(model) or {}).get("tile", DEFAULT_TILE), device)[0]
        print(f"{args.model}: calibrated {len(calibrator.slots)} slots for {source} in {seconds:.2f} s")
        print(format_table(["layer", "rank", "per-chip weights"], [
            [slot.layer.node, str(slot.candidate.rank),
             f"{sum(calibration.values[n].size for n in (slot.candidate.up, slot.candidate.gain, slot.candidate.offset)):,}"]
            for slot in calibrator.slots], "lrr"))
        report = {"model": str(args.model), "output": str(args.output), "source": source, "seconds": seconds,
                  "device": device.describe(), "slots": {s.layer.node: s.candidate.rank for s in calibrator.slots}}
        if chip_id is not None:
            test = load_data(args.data, "test").subset(args.test_limit)
            check_labels(test, model)
            x_test = evaluator.prepare(preprocess.apply(test.x), test.name)
            before = evaluator.chip_accuracy(x_test, test.y, *chip_id)
            after = evaluator.chip_accuracy(x_test, test.y, *chip_id, calibration.values)
            clean = evaluator.clean_accuracy(x_test, test.y)
            print(format_table(["chip", "accuracy"], [["clean (no variation)", percent(clean)],
                                                      ["uncalibrated", percent(before)], ["calibrated", percent(after)]]))
            print(f"(on {len(test.y)} {test.name} test images)")
            report.update(clean_accuracy=clean, uncalibrated=before, calibrated=after, test_images=len(test.y))
        save_model(chip_graph, out["-o"])
        print(f"chip graph: {args.output}")
        if args.dump_measurements:
            save_measurements(calibration.measurements, out["--dump-measurements"])
            print(f"measurements: {args.dump_measurements}")
        if args.json:
            write_json(report, out["--json"])
            print(f"report: {args.json}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    with outputs(input_files(args), {"--json": args.json}) as out:
        with about(args.model):
            original = load_model(args.model)
            untiled = onnx.ModelProto.FromString(original.SerializeToString())
            # a deployed graph's tiles and ADCs: counted as it lays them out (canonicalizing would
            # fold the tiled weights into constants)
            hardware = HardwareReport.of(original, args.tile) if untile(untiled) else None
            model = pipeline.canonicalize(untiled)
        own = {layer.name: layer for layer in hardware.layers} if hardware else {}
        shapes = tensor_shapes(model)
        try:
            name, shape = model_io(model)
        except UnsupportedModelError:  # several data inputs: inspect still lists them below
            name, shape = "", []
        layers = analog_layers(model)
        rows, report_layers = [], []
        for layer in layers:
            macs = macs_per_sample(model, layer, shapes)
            tiles = own[layer.node].tiles if layer.node in own else layer.tiles(args.tile)
            rows.append([layer.node, layer.op, layer.weight, "x".join(map(str, layer.weight_shape)), f"{layer.params:,}",
                         f"{macs:,}" if macs is not None else "?", f"{layer.rows}x{layer.cols}", tiles])
            report_layers.append({"node": layer.node, "op": layer.op, "weight": layer.weight, "weight_shape": list(layer.weight_shape),
                                  "params": layer.params, "macs": macs, "crossbar": [layer.rows, layer.cols], "tiles": tiles})

        def signature(values) -> list[str]:
            return [f"{v.name} [{', '.join(str(d.dim_param or d.dim_value) for d in v.type.tensor_type.shape.dim)}]" for v in values]

        print(f"{args.model}: opset {default_opset(original)} (canonical {default_opset(model)}), "
              f"{len(original.graph.node)} nodes ({len(model.graph.node)} canonical), producer {original.producer_name or '?'}")
        print(f"inputs:  {', '.join(signature(model.graph.input))}")
        print(f"outputs: {', '.join(signature(model.graph.output))}")
        if not rows:
            print("analog layers: none (no Conv, Gemm or MatMul with a constant weight)")
        else:
            total_params = sum(layer.params for layer in layers)
            total_macs = sum(r["macs"] or 0 for r in report_layers)
            rows.append(["total", "", "", "", f"{total_params:,}", f"{total_macs:,}", "", sum(r["tiles"] for r in report_layers)])
            sizes = ", ".join(dict.fromkeys(f"{own[layer.node].tile_rows}x{own[layer.node].tile_cols}" if layer.node in own
                                            else f"{args.tile}x{args.tile}" for layer in layers))
            print(f"analog layers ({len(layers)}, crossbar tiles of {sizes}):")
            print(format_table(["layer", "op", "weight", "shape", "params", "MACs/sample", "rows x cols", "tiles"], rows, "llllrrrr"))
        if hardware and hardware.adc_layers:
            print("ADCs: every tile's column outputs converted, per inference (one input)")
            print(format_table(list(HardwareReport.ADC_HEADERS), hardware.adc_rows(), "lrrr"))
            print(hardware.adc_summary())
        if args.json:
            write_json({"model": str(args.model), "opset": default_opset(original), "input": {"name": name, "shape": shape},
                        "tile": args.tile, "layers": report_layers,
                        **({"adc": hardware.to_dict()["adc"]} if hardware and hardware.adc_layers else {})}, out["--json"])
    return 0


def _check_lipschitz_form(form: str) -> None:
    if form not in FORMS:
        raise OptionError(f"--lipschitz-form {form!r}: expected one of {', '.join(FORMS)}")


def finetune_config(args: argparse.Namespace) -> FinetuneConfig:
    """The :class:`~rrcompile.finetune.FinetuneConfig` that ``finetune``'s command line asks for."""
    _check_lipschitz_form(args.lipschitz_form)
    return FinetuneConfig(
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, val_fraction=args.val_fraction,
        patience=args.patience, seed=args.seed,
        lipschitz=LipschitzPenalty(args.lipschitz, args.lipschitz_form, args.lipschitz_target) if args.lipschitz else None,
        noise_injection=parse_device(args.noise_injection) if args.noise_injection else None,
        validation_device=None if args.device == "none" else parse_device(args.device),
        validation_chips=args.validation_chips, device_type=args.device_type,
    )


def cmd_finetune(args: argparse.Namespace) -> int:
    config = finetune_config(args)
    default_device(args.device_type)  # cuda without a GPU is refused before any work
    preprocess = Preprocess.parse(args.scale, args.mean, args.std)
    device_specs = (args.noise_injection, None if args.device == "none" else args.device)
    with outputs(input_files(args, *device_specs), {"-o": args.output, "--json": args.json}) as out:
        with about(args.model):
            model = pipeline.canonicalize(load_model(args.model))
            check_model_for_data(model)
            for device in (config.noise_injection, config.validation_device):
                if device is not None:
                    device.check_patterns(analog_layers(model))
            input_name, input_shape = model_io(model)
        data = load_data(args.data, "train").subset(args.limit)
        check_labels(data, model)
        x = fit_to_input(preprocess.apply(data.x), input_name, input_shape, data_name=data.name)
        # ADC ranges fixed once, on the model as given: training learns under those converters
        config = dataclasses.replace(config, **{name: with_adc_ranges(model, getattr(config, name), x[:ADC_IMAGES])
                                                for name in ("noise_injection", "validation_device")
                                                if getattr(config, name) is not None})

        started = time.perf_counter()
        result = finetune(model, x, data.y, config, progress=args.progress)
        elapsed = time.perf_counter() - started
        save_model(result.model, out["-o"])

        method = " + ".join(filter(None, [
            f"Lipschitz {args.lipschitz_form} beta={args.lipschitz:g}" if config.lipschitz else "",
            f"noise injection {config.noise_injection.describe()}" if config.noise_injection else "",
        ])) or "plain"
        print(f"{args.model}: fine-tuned on {data.name} ({len(data.y)} train images, {args.val_fraction:g} held out), "
              f"{method}, seed {args.seed}, {elapsed:.1f} s")
        varied_label = f"val acc ({config.validation_chips} chips)" if config.validation_device else "val acc (varied)"
        print(format_table(["epoch", "loss", "penalty", "val acc (clean)", varied_label], [
            [f"{log.epoch}{' *' if log.epoch == result.best_epoch else ''}",
             "-" if log.loss is None else f"{log.loss:.4f}", "-" if log.penalty is None else f"{log.penalty:.4f}",
             percent(log.clean_val), "-" if log.varied_val is None else percent(log.varied_val)]
            for log in result.history
        ]))
        before, after = result.spectral_before, result.spectral_after
        print("\nspectral norm per analog layer (power iteration)")
        print(format_table(["layer", "before", "after"], [
            *([name, f"{before.norms[name]:.3f}", f"{after.norms[name]:.3f}"] for name in before.norms),
            ["product", f"{before.product:.3f}", f"{after.product:.3f}"],
        ], "lrr"))
        print(f"model: {args.output} (epoch {result.best_epoch} kept)")
        if args.json:
            write_json({
                "model": str(args.model), "output": str(args.output), "data": data.name, "train_images": len(data.y),
                "method": method, "config": _options(args),
                "best_epoch": result.best_epoch, "seconds": elapsed,
                "history": [dataclasses.asdict(log) for log in result.history],
                "spectral_norms": {"before": before.norms, "after": after.norms,
                                   "product_before": before.product, "product_after": after.product},
            }, out["--json"])
            print(f"report: {args.json}")
    return 0


def _options(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("run", "command", "progress")}


def compile_options(args: argparse.Namespace, device: DeviceConfig) -> pipeline.CompileOptions:
    """The :class:`~rrcompile.pipeline.CompileOptions` that ``compile``'s command line asks for."""
    _check_lipschitz_form(args.lipschitz_form)
    return pipeline.CompileOptions(
        device, lipschitz=not args.no_lipschitz, noise_injection=not args.no_noise_injection,
        compensation=not args.no_compensation, rl=not args.no_rl,
        finetune=FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size), beta=args.lipschitz,
        lipschitz_form=args.lipschitz_form, budget=args.budget,
        train=CompensationConfig(epochs=args.compensation_epochs, batch_size=args.batch_size),
        final_epochs=args.final_epochs, episodes=args.episodes, overhead_weight=args.overhead_weight,
        rl_chips=args.rl_chips, rl_images=args.rl_images, tile=args.tile, seed=args.seed,
        calibration=not args.trained_compensation, calibration_images=args.calibration_images,
        calibration_finetune=args.calibration_finetune, device_type=args.device_type)


@dataclasses.dataclass
class _Compiled:
    """One ``rrcompile compile`` run: what it compiled, and the Monte Carlo report measured after."""

    args: argparse.Namespace
    device: DeviceConfig
    train: Dataset
    test: Dataset
    result: pipeline.CompileResult
    calibrating: bool  # calibration slots (else trained compensation, or none)
    compile_seconds: float
    rows: dict[str, ChipStats] = dataclasses.field(default_factory=dict)  # original, compiled (+ calibrated)
    curves: dict[str, dict[float, ChipStats]] = dataclasses.field(default_factory=dict)  # the same against sigma
    report_seconds: float = 0.0


def cmd_compile(args: argparse.Namespace) -> int:
    device = parse_device(args.device)
    sweep = parse_sweep(args.sigma_sweep) if args.sigma_sweep else []
    if sweep and not device.lognormal_sigmas():
        if args.sigma_sweep != COMPILE_SWEEP:  # asked for: refused before any work
            raise DeviceSpecError(f"--sigma-sweep needs a 'lognormal' device model in --device ({args.device})")
        sweep = []  # the default sweep has nothing to sweep
    options = compile_options(args, device)
    check_scale(args)
    preprocess = Preprocess.parse(args.scale, args.mean, args.std)
    out_path = Path(args.output)
    planned = {"-o": out_path, "--simulate-output": args.simulate_output, "report": out_path.with_suffix(".report.json"),
               "plot": out_path.with_suffix(".sigma.png") if sweep and not args.no_report else None}
    with outputs(input_files(args, args.device), planned) as out, contextlib.ExitStack() as scope:
        with about(args.model):
            original = pipeline.canonicalize(load_model(args.model))
            check_model_for_data(original)
            device.check_patterns(analog_layers(original))
            input_name, input_shape = model_io(original)
        train, test = load_data(args.data, "train").subset(args.limit), load_data(args.data, "test").subset(args.test_limit)
        check_labels(train, original)
        check_labels(test, original)
        x_train = fit_to_input(preprocess.apply(train.x), input_name, input_shape, data_name=train.name)
        x_test = fit_to_input(preprocess.apply(test.x), input_name, input_shape, data_name=test.name)
        # ADC ranges fixed once, on the original network (as pipeline.compile would): the original
        # and the compiled model are measured, trained and deployed with the same converters
        device = with_adc_ranges(original, device, x_train[:ADC_IMAGES])
        options = dataclasses.replace(options, device=device)
        log = (lambda _: None) if args.quiet else print
        # Ray, if asked for, starts once the inputs are known to be good
        executor = scope.enter_context(chip_executor(args.workers, args.ray_address))

        started = time.perf_counter()
        with about(args.model):
            result = pipeline.compile(original, x_train, train.y, options, progress=args.progress, log=log,
                                      executor=executor)
        run = _Compiled(args, device, train, test, result, options.compensation and options.calibration,
                        time.perf_counter() - started)
        if not args.no_report:
            log("[*] report: Monte Carlo evaluation on the test set ...")
            _evaluate_compiled(run, original, x_test, sweep, executor)
        _print_compiled(run)

        save_model(result.deployed, out["-o"])
        if args.simulate_output:
            save_model(InsertVariationPass(device)(result.model).model, out["--simulate-output"])
        if run.curves:
            plot_sigma_sweep(run.curves, out["plot"], f"{Path(args.model).name}: {' vs '.join(run.curves)}")
        write_json(_compiled_report(run), out["report"])
        print(f"\nmodel: {out_path}\nreport: {planned['report']}" + (f"\nplot: {planned['plot']}" if run.curves else "")
              + (f"\nsimulation graph: {args.simulate_output}" if args.simulate_output else ""))
    return 0


def _evaluate_compiled(run: _Compiled, original: onnx.ModelProto, x_test, sweep: list[float],
                       executor: ChipExecutor) -> None:
    """Fill ``run``'s rows and curves: the original and the compiled model over the same chips of the
    test set. Nothing is measured twice: when compile left the network as given, the compiled
    model's uncalibrated chips are the original's, reported as both; the sweep's point at the
    compile's own sigma is the table's first ``--sweep-samples`` chips."""
    args, device, result, y_test = run.args, run.device, run.result, run.test.y
    on = dict(device_type=args.device_type)  # where every evaluator of the report runs
    chips = dict(progress=args.progress, executor=executor)  # and who runs its chips
    started = time.perf_counter()
    if not result.network_as_given:
        run.rows["original"] = MonteCarloEvaluator(original, device, **on).evaluate(x_test, y_test, args.samples,
                                                                                    args.seed, **chips)
    if run.calibrating:
        run.rows["compiled"], run.rows["compiled + calibrated"] = CalibratedEvaluator(
            result.model, device, result.x_calibration, **on).evaluate(x_test, y_test, args.samples, args.seed, **chips)
    else:
        run.rows["compiled"] = MonteCarloEvaluator(result.model, device, **on).evaluate(x_test, y_test, args.samples,
                                                                                        args.seed, **chips)
    if result.network_as_given:
        run.rows = {"original": run.rows["compiled"], **run.rows}
    compiled_for = device.lognormal_sigmas()
    # the sweep's point at the compile's own sigma (one sigma everywhere) is the table's first chips
    tabled = [*compiled_for] if len(compiled_for) == 1 and args.sweep_samples <= args.samples else []
    if sweep:
        sweep = sorted({*sweep, *tabled})  # the compile's own sigma, on the plot for free
        sigmas = [s for s in sweep if s not in tabled]
        if not result.network_as_given:
            run.curves["original"] = sigma_sweep(original, device, sigmas, x_test, y_test, args.sweep_samples,
                                                 args.seed, **on, **chips)
        if run.calibrating:
            run.curves["compiled"], run.curves["compiled + calibrated"] = calibrated_sigma_sweep(
                result.model, device, sigmas, result.x_calibration, x_test, y_test, args.sweep_samples,
                args.seed, **on, **chips)
        else:
            run.curves["compiled"] = sigma_sweep(result.model, device, sigmas, x_test, y_test, args.sweep_samples,
                                                 args.seed, **on, **chips)
        if result.network_as_given:
            run.curves = {"original": run.curves["compiled"], **run.curves}
        for label, curve in run.curves.items():
            row = run.rows[label]
            curve.update({s: ChipStats(row.clean_accuracy, row.chip_accuracies[:args.sweep_samples]) for s in tabled})
            run.curves[label] = dict(sorted(curve.items()))
    run.report_seconds = time.perf_counter() - started


def _print_compiled(run: _Compiled) -> None:
    """The compile's summary: accuracy table, slots or kept compensation, overhead, selection, time per stage."""
    args, result, hardware, calibrating = run.args, run.result, run.result.hardware, run.calibrating
    print(f"\n{args.model} compiled for {run.device.describe()} on {run.train.name} ({len(run.train.y)} train, "
          f"{len(run.test.y)} test images), seed {args.seed}: compile {run.compile_seconds:.0f} s"
          + (f", report {run.report_seconds:.0f} s" if run.rows else " (--no-report: no evaluation)"))
    if run.rows:
        print(format_table(["", "clean", "mean", "5th pct", "worst", f"yield ({args.samples} chips)"], [
            [label, percent(s.clean_accuracy), percent(s.mean), percent(s.p5), percent(s.worst), percent(s.yield_)]
            for label, s in run.rows.items()
        ]))
        if result.network_as_given:
            print("compile left the network's weights as given: the compiled chips, uncalibrated, are the "
                  "original's (measured once)")
    if calibrating:
        print(f"calibration slots (rank): {', '.join(f'{layer} ({rank})' for layer, rank in result.ranks.items())}; "
              f"each chip calibrated on {len(result.x_calibration)} unlabeled train images, "
              f"{hardware.calibration_seconds:.2f} s a chip here")
    else:
        print(f"compensation: {', '.join(result.kept) or 'none'} kept")
    print(f"{hardware.digital_weights:,} digital weights over {hardware.analog_weights:,} analog "
          f"({hardware.overhead_percent:.2f}%), {sum(c.macs or 0 for c in candidates(result.model)):,} extra MACs per sample")
    if hardware.adc_layers:
        print(f"ADCs: {hardware.adc_conversions:,} conversions, {hardware.adc_energy_pj / 1e3:,.3f} nJ per inference; "
              f"{hardware.adc_summary()}")
    if result.selection:
        scored = "calibrated validation chips" if calibrating else "validation chips"
        if "fine-tune for calibration" in result.seconds:
            scored += ", before fine-tuning"
        print(f"\nselection on the {scored} (reward = accuracy - overhead_weight x overhead)")
        print(format_table(["strategy", "ranks" if calibrating else "kept", "val accuracy", "overhead", "reward"], [
            [name, _choice(r, calibrating), percent(r.accuracy), percent(r.overhead),
             f"{r.reward:.4f}" if r.overhead <= args.budget else "over budget"]
            for name, r in result.selection.items()
        ], "llrrr"))
    print("\ntime per stage")
    print(format_table(["stage", "seconds"], [[name, f"{sec:.1f}"] for name, sec in result.seconds.items()]))


def _compiled_report(run: _Compiled) -> dict:
    """``OUT.report.json``: the options, the accuracy before and after, the choices, the hardware and the times."""
    args, result, rows = run.args, run.result, run.rows
    return {
        "model": str(args.model), "output": str(Path(args.output)), "data": run.train.name, "device": run.device.describe(),
        "seed": args.seed, "options": _options(args),
        **({"before": rows["original"].summary(), "after": rows["compiled"].summary()} if rows else {}),
        **({"calibrated": rows["compiled + calibrated"].summary()} if rows and run.calibrating else {}),
        "network_as_given": result.network_as_given,
        "kept": result.kept, **({"ranks": result.ranks, "calibration_images": len(result.x_calibration)}
                                if run.calibrating else {}),
        "hardware": result.hardware.to_dict(), "seconds": result.seconds, "compile_seconds": run.compile_seconds,
        "report_seconds": run.report_seconds,
        "selection": {name: {"kept": r.kept_layers, "values": dict(zip(r.layers, r.values)), "accuracy": r.accuracy,
                             "overhead": r.overhead, "reward": r.reward, "rewards_per_episode": r.rewards}
                      for name, r in result.selection.items()},
        "sigma_sweep": {label: [{"sigma": s, **r.summary()} for s, r in curve.items()] for label, curve in run.curves.items()},
    }


def _choice(result: SearchResult, calibrating: bool) -> str:
    """A selection's choice: each slot's rank, or the layers whose candidate is kept."""
    return "/".join(map(str, result.values)) if calibrating else ", ".join(result.kept_layers) or "-"


def cmd_deploy(args: argparse.Namespace) -> int:
    with outputs(input_files(args), {"-o": args.output, "--json": args.json}) as out:
        with about(args.model):
            model = load_model(args.model)
            if not any(o.domain == RRCOMPILE_DOMAIN for o in model.opset_import):
                model = pipeline.canonicalize(model)
            if not analog_layers(model):
                raise UnsupportedModelError(NO_ANALOG_LAYER)
            deployed, hardware = redeploy(model, args.tile, compiled_device(model))
        sizes = ", ".join(dict.fromkeys(f"{layer.tile_rows}x{layer.tile_cols}" for layer in hardware.layers))
        print(f"{args.model}: {len(hardware.layers)} analog layers on {hardware.total_tiles} crossbar tiles of "
              f"{sizes}; {hardware.digital_weights:,} digital weights ({hardware.overhead_percent:.2f}% overhead)")
        print(format_table(list(HardwareReport.HEADERS), hardware.rows(), "llrrrr"))
        if hardware.calibration_slots:
            images = f"{hardware.calibration_images} calibration images" if hardware.calibration_images else "calibration images unknown"
            seconds = f"{hardware.calibration_seconds:.2f} s" if hardware.calibration_seconds is not None else "? s"
            print(f"\ncalibrated per chip: {hardware.per_chip_weights:,} digital weights, {images}, {seconds} a chip "
                  f"(measured at compile)")
            print(format_table(["slot", "rank", "per-chip weights"], hardware.calibration_rows(), "lrr"))
        if hardware.adc_layers:
            print("\nADCs: every tile's column outputs converted, per inference (one input)")
            print(format_table(list(HardwareReport.ADC_HEADERS), hardware.adc_rows(), "lrrr"))
            print(hardware.adc_summary())
        save_model(deployed, out["-o"])
        if args.json:
            write_json(hardware.to_dict(), out["--json"])
    print(f"deployed: {args.output}")
    return 0


def redeploy(model: onnx.ModelProto, tile: int, device: DeviceConfig | None) -> tuple[onnx.ModelProto, HardwareReport]:
    """:func:`deploy` for ``model`` on ``device``, keeping what a model deployed before recorded at its
    compile (the calibration facts)."""
    recorded = (HardwareReport.from_model(model) or {}).get("calibration") or {}
    return deploy(model, tile, device=device, calibration_images=recorded.get("images"),
                  calibration_seconds=recorded.get("seconds_per_chip"))


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and exit code 2, like every other rrcompile error."""

    def error(self, message: str):
        raise OptionError(f"{message} (see {self.prog} --help)")


def _number(kind: type, low: float, *, low_open: bool = False, high: float = math.inf, high_open: bool = False):
    """An argparse ``type`` accepting a finite ``kind`` in the given range; argparse names the option."""
    bounds = (f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}" if high < math.inf
              else f"{'>' if low_open else '>='} {low:g}")
    expected = f"{'an integer' if kind is int else 'a finite number'} {'in ' if high < math.inf else ''}{bounds}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {expected}") from None
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"{text!r} is not {expected}")
        return value

    parse.__name__ = kind.__name__  # argparse's fallback message names the type
    return parse


positive_int = _number(int, 1)
nonnegative_int = _number(int, 0)
positive_float = _number(float, 0, low_open=True)
nonnegative_float = _number(float, 0)
open_fraction = _number(float, 0, low_open=True, high=1, high_open=True)
budget_fraction = _number(float, 0, low_open=True, high=1)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rrcompile", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("evaluate", help="Monte Carlo accuracy of a model over simulated RRAM chips")
    ev.add_argument("model", help="ONNX classifier")
    ev.add_argument("--data", default=DEFAULT_DATA,
                    help=f"digits | mnist:DIR | fashion-mnist:DIR | cifar10:DIR | npz:FILE (default: {DEFAULT_DATA})")
    ev.add_argument("--split", default="test", choices=["test", "train"])
    ev.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N images")
    ev.add_argument("--device", default=None,
                    help=f"device models, e.g. lognormal:sigma=0.5+read:eta=0.01 or tile:size=128+adc:bits=8+lognormal:"
                         f"sigma=0.5 (ADC ranges fixed on {ADC_IMAGES} train images), or a .json/.yaml device file "
                         f"(default: {DEFAULT_DEVICE}; a simulation graph brings its own)")
    ev.add_argument("--samples", type=positive_int, default=CHIPS, help="simulated chips (Monte Carlo samples)")
    ev.add_argument("--seed", type=nonnegative_int, default=0)
    ev.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE)
    _add_preprocess(ev)
    ev.add_argument("--sigma-sweep", help=f"also sweep log-normal sigma, e.g. 0,0.1,...,0.8 (at most {MAX_SWEEP_POINTS} "
                                          f"points), and plot it")
    ev.add_argument("--plot", help="PNG path for --sigma-sweep (default: MODEL.sigma.png)")
    ev.add_argument("--calibrate", type=positive_int, metavar="N",
                    help="calibrate every chip on the first N unlabeled train images and report both (a compiled model)")
    ev.add_argument("--json", help="write the report as JSON")
    _add_scale(ev)
    _add_verbosity(ev)
    ev.set_defaults(run=cmd_evaluate)

    ca = sub.add_parser("calibrate", help="calibrate one programmed chip of a compiled model: its own hardware-ready graph")
    ca.add_argument("model", help="deployed ONNX model from rrcompile compile")
    ca.add_argument("--data", default=DEFAULT_DATA, help="data spec: unlabeled train images calibrate, test images evaluate")
    source = ca.add_mutually_exclusive_group(required=True)
    source.add_argument("--chip", metavar="SEED:INDEX", help="a simulated chip: chip INDEX of Monte Carlo run SEED")
    source.add_argument("--measured", metavar="F.npz", help="measurements of a real chip (format in the README)")
    ca.add_argument("--device", default=None, help="device of the simulated chip (default: the one compiled for)")
    ca.add_argument("--images", type=positive_int, default=default(pipeline.CompileOptions, "calibration_images"),
                    help="calibration images (simulated chip)")
    ca.add_argument("--test-limit", type=positive_int, default=None, help="evaluate on the first N test images only")
    ca.add_argument("-o", "--output", required=True, help="the chip's calibrated ONNX graph")
    ca.add_argument("--dump-measurements", metavar="F.npz", help="also write what the simulated chip measured")
    ca.add_argument("--single-pass", action="store_true",
                    help="measurements from one pass of the uncalibrated chip (a real chip measured without "
                         "rrcompile in the loop): each slot matches its layer's ideal W x on what the layer saw")
    _add_preprocess(ca)
    ca.add_argument("--json", help="write the report as JSON")
    _add_device_type(ca)
    _add_verbosity(ca)
    ca.set_defaults(run=cmd_calibrate)

    ft = sub.add_parser("finetune", help="fine-tune with Lipschitz regularization and/or noise injection")
    ft.add_argument("model", help="ONNX classifier")
    ft.add_argument("--data", default=DEFAULT_DATA, help=f"data spec; its train split is used (default: {DEFAULT_DATA})")
    ft.add_argument("--limit", type=positive_int, default=None, help="train on the first N images only")
    ft.add_argument("-o", "--output", required=True, help="fine-tuned ONNX model to write")
    ft.add_argument("--lipschitz", type=nonnegative_float, default=0.0, metavar="BETA", help="penalty weight (0: off)")
    ft.add_argument("--lipschitz-form", default=default(LipschitzPenalty, "form"),
                    help="spectral (hinge on ||W||_2) or orthogonal (||W W^T - I||_F^2)")
    ft.add_argument("--lipschitz-target", type=positive_float, default=default(LipschitzPenalty, "target"),
                    help="spectral form: norm left unpenalized")
    ft.add_argument("--noise-injection", metavar="SPEC", help="train on a fresh chip of this device per mini-batch")
    ft.add_argument("--device", default=DEFAULT_DEVICE,
                    help="device the validation chips simulate to pick the epoch to keep ('none': clean accuracy)")
    ft.add_argument("--validation-chips", type=positive_int, default=default(FinetuneConfig, "validation_chips"))
    ft.add_argument("--epochs", type=positive_int, default=default(FinetuneConfig, "epochs"))
    ft.add_argument("--lr", type=positive_float, default=default(FinetuneConfig, "lr"))
    ft.add_argument("--batch-size", type=positive_int, default=default(FinetuneConfig, "batch_size"))
    ft.add_argument("--val-fraction", type=open_fraction, default=default(FinetuneConfig, "val_fraction"))
    ft.add_argument("--patience", type=positive_int, default=default(FinetuneConfig, "patience"),
                    help="epochs without a better one before stopping")
    ft.add_argument("--seed", type=nonnegative_int, default=default(FinetuneConfig, "seed"))
    _add_preprocess(ft)
    ft.add_argument("--json", help="write the training report as JSON")
    _add_device_type(ft, "torch training")
    _add_verbosity(ft)
    ft.set_defaults(run=cmd_finetune)

    compile_default = functools.partial(default, pipeline.CompileOptions)
    co = sub.add_parser("compile", help="make a model robust to a device: Lipschitz fine-tune, RL-chosen compensation, deploy")
    co.add_argument("model", help="ONNX classifier")
    co.add_argument("--data", default=DEFAULT_DATA, help="data spec: its train split trains, its test split evaluates")
    co.add_argument("--device", default=DEFAULT_DEVICE, help="device spec or device file")
    co.add_argument("-o", "--output", required=True, help="deployed ONNX model; OUT.report.json and OUT.sigma.png beside it")
    co.add_argument("--simulate-output", help="also write the compiled graph with the variation ops in (for evaluate)")
    co.add_argument("--no-lipschitz", action="store_true", help="fine-tune without the Lipschitz penalty")
    co.add_argument("--no-noise-injection", action="store_true",
                    help="fine-tune on exact weights, not on sampled chips (with --no-lipschitz: no fine-tuning)")
    co.add_argument("--no-compensation", action="store_true", help="skip compensation (and RL)")
    co.add_argument("--no-rl", action="store_true",
                    help="no RL: ranks by sensitivity (calibration), or every candidate kept (--trained-compensation)")
    co.add_argument("--trained-compensation", action="store_true",
                    help="the paper's compensation, trained once for every chip, instead of calibrated per chip")
    co.add_argument("--calibration-images", type=positive_int, default=compile_default("calibration_images"),
                    help="unlabeled train images each chip is calibrated on")
    co.add_argument("--calibration-finetune", choices=pipeline.CALIBRATION_FINETUNES,
                    default=compile_default("calibration_finetune"),
                    help="with calibration, what is fine-tuned: none (the network as given, which calibration "
                         "repairs per chip; it did best as measured), calibrated (after the ranks, each mini-batch's "
                         "chip calibrated) or raw (first, on raw chips) (default: none)")
    co.add_argument("--lipschitz", type=nonnegative_float, default=compile_default("beta"), metavar="BETA")
    co.add_argument("--lipschitz-form", default=compile_default("lipschitz_form"), help="spectral or orthogonal")
    co.add_argument("--epochs", type=positive_int, default=default(FinetuneConfig, "epochs"), help="Lipschitz fine-tuning epochs")
    co.add_argument("--budget", type=budget_fraction, default=compile_default("budget"),
                    help="compensation weights as a fraction of analog weights: per candidate (its rank) and in total")
    co.add_argument("--compensation-epochs", type=positive_int, default=default(CompensationConfig, "epochs"))
    co.add_argument("--final-epochs", type=nonnegative_int, default=compile_default("final_epochs"),
                    help="training of the kept compensation")
    co.add_argument("--episodes", type=positive_int, default=compile_default("episodes"), help="RL episodes")
    co.add_argument("--overhead-weight", type=nonnegative_float, default=compile_default("overhead_weight"),
                    help=f"lambda: reward = accuracy - lambda x overhead (default {pipeline.OVERHEAD_WEIGHT['calibrated']:g}; "
                         f"{pipeline.OVERHEAD_WEIGHT['trained']:g} with --trained-compensation)")
    co.add_argument("--rl-chips", type=positive_int, default=compile_default("rl_chips"))
    co.add_argument("--rl-images", type=positive_int, default=compile_default("rl_images"))
    co.add_argument("--samples", type=positive_int, default=CHIPS, help="chips for the before/after evaluation")
    co.add_argument("--no-report", action="store_true",
                    help="skip the Monte Carlo report (table, sigma sweep, plot): compile and deploy only")
    co.add_argument("--sigma-sweep", default=COMPILE_SWEEP,
                    help="sigmas of the plot, with the compile's own added from the table ('' for none)")
    co.add_argument("--sweep-samples", type=positive_int, default=SWEEP_CHIPS, help="chips per sigma in the sweep")
    co.add_argument("--tile", type=positive_int, default=compile_default("tile"))
    # one mini-batch size for the fine-tune and the compensation training (their configs agree on the default)
    co.add_argument("--batch-size", type=positive_int, default=default(FinetuneConfig, "batch_size"))
    co.add_argument("--limit", type=positive_int, default=None, help="train on the first N images only")
    co.add_argument("--test-limit", type=positive_int, default=None, help="evaluate on the first N test images only")
    co.add_argument("--seed", type=nonnegative_int, default=compile_default("seed"))
    _add_preprocess(co)
    _add_scale(co, "torch training, calibration and the report's Monte Carlo")
    _add_verbosity(co)
    co.set_defaults(run=cmd_compile)

    de = sub.add_parser("deploy", help="strip simulation ops, tag analog/digital nodes, report crossbar tiles")
    de.add_argument("model")
    de.add_argument("-o", "--output", required=True)
    de.add_argument("--tile", type=positive_int, default=DEFAULT_TILE)
    de.add_argument("--json", help="write the hardware report as JSON")
    _add_verbosity(de)
    de.set_defaults(run=cmd_deploy)

    ins = sub.add_parser("inspect", help="list a model's analog layers, opset, inputs and outputs")
    ins.add_argument("model")
    ins.add_argument("--tile", type=positive_int, default=DEFAULT_TILE, help="crossbar tile size (rows = columns)")
    ins.add_argument("--json", help="write the layer table as JSON")
    _add_verbosity(ins)
    ins.set_defaults(run=cmd_inspect)
    return parser


def default(config: type, name: str):
    """The default of field ``name`` of dataclass ``config``: options that set a config field take
    their default from it, so each default is written once."""
    field = config.__dataclass_fields__[name]
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def _add_preprocess(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("input preprocessing: x = (pixels / scale - mean) / std")
    group.add_argument("--scale", default=f"{default(Preprocess, 'scale'):g}")
    for name in ("mean", "std"):
        group.add_argument(f"--{name}", default=",".join(f"{v:g}" for v in default(Preprocess, name)),
                           help="one value or a comma list per channel")


def _add_device_type(parser: argparse.ArgumentParser, what: str = "calibration and Monte Carlo inference") -> None:
    parser.add_argument("--device-type", choices=DEVICE_TYPES, default="auto",
                        help=f"where {what} runs: auto is CUDA when torch sees a GPU, else the CPU (default: auto)")


def _add_scale(parser: argparse.ArgumentParser, what: str = "calibration and Monte Carlo inference") -> None:
    group = parser.add_argument_group("scale: chips run in this process unless Ray is asked for (pip install -e '.[ray]')")
    group.add_argument("--workers", type=positive_int, metavar="N",
                       help="run chips on N Ray workers: a local Ray instance with N CPUs (with --ray-address: N "
                            "workers on that cluster; default there: one per CPU)")
    group.add_argument("--ray-address", metavar="ADDR", help="join the Ray cluster at ADDR (e.g. 10.0.0.1:6379 or auto)")
    _add_device_type(group, what)


def check_scale(args: argparse.Namespace) -> None:
    """Refuse, before any work, a GPU asked of Ray workers, and a device type this machine lacks."""
    if args.device_type == "cuda" and (args.workers or args.ray_address):
        raise OptionError("--device-type cuda runs chips in this process: drop --workers and --ray-address "
                          "(Ray workers run chips on their CPUs)")
    default_device(args.device_type)


def _add_verbosity(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quiet", action="store_true", help="no progress output, only results and errors")
    group.add_argument("--verbose", action="store_true",
                       help="progress bars even when stderr is not a terminal, and the libraries' warnings")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        # progress bars redraw a line with carriage returns: only a terminal shows them as intended
        args.progress = args.verbose or (not args.quiet and sys.stderr.isatty())
        set_library_logging(verbose=args.verbose)
        return args.run(args)
    except RRCompileError as exc:
        print(f"rrcompile: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
