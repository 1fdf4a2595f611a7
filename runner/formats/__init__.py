"""Files on disk: Hugging Face config, safetensors, tokenizer, chat templates and
generation defaults; orbax checkpoints; export back to a Hugging Face folder."""
