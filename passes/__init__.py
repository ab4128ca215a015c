"""Graph passes, one per file (installed as ``rrcompile.passes``)."""
