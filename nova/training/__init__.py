"""`nova train`: PEFT LoRA fine-tuning of a new Nova adapter from JSONL triplets."""
