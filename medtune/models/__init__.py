"""Model pieces: Llama-3 decoders and tokenizer, image encoders, connectors, MedVLM, named builders."""
