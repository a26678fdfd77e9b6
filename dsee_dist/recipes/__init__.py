"""Readable runs: run (the training command: finetune, or two_stage when prune.method is set), finetune
(setup -> fit -> evaluate_loss -> save), two_stage (tune, prune, re-tune), export, fetch (models fetch), and
the other commands."""
