"""Task cells: train a small model with an attention plugged into the slots of one pattern, evaluate it
(`cell_kind`, `loop`), lay a config's `tasks` section out as cells (`expand`), and summarise the stored results
(`summary`). The package imports nothing itself, so that loading a config does not load the training."""
