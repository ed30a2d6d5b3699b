"""Model merging: methods registry, per-key rules, planning and streaming execution."""
