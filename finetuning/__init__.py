"""finetuning stage."""
