"""Names every room shares for vision-language models (the image placeholder, the processor and mmproj files)."""

IMAGE_MARKER = "<image>"  # where the image goes in a rendered prompt (llava-hf's image token text)
PROCESSOR_FILE = "preprocessor_config.json"  # image resize / crop / normalisation (CLIPImageProcessor)
MMPROJ_PREFIX = "mmproj-"  # llama.cpp's name for the vision tower + projector GGUF beside the language model
