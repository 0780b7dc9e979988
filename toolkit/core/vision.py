"""Names every room shares for vision-language models (the image placeholder, the processor and mmproj files)."""

IMAGE_MARKER = "<image>"  # where the image goes in a rendered prompt (llava-hf's image token text)
PROCESSOR_FILE = "preprocessor_config.json"  # image resize / crop / normalisation (CLIPImageProcessor)
MMPROJ_PREFIX = "mmproj-"  # llama.cpp's name for the vision tower + projector GGUF beside the language model
ONNX_VISION_FILE = "vision_encoder.onnx"  # an ONNX LLaVA export: pixels -> projected image features
ONNX_EMBEDDING_FILE = "embed_tokens.onnx"  # an ONNX LLaVA export: token ids -> embeddings (model.onnx takes embeddings)
