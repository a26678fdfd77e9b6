"""Readable runs: finetune (setup -> fit -> evaluate -> save), two_stage, export."""
