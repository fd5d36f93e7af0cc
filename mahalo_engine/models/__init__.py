"""Model definitions: the native decoder shared by the Llama, Mistral, Qwen2 and Qwen3 families."""
