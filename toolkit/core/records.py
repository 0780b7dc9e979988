"""Names and versions of the records stages leave beside their files, and the defaults they share."""

SCHEMA_VERSION = 1  # of every JSON/YAML record Bedside writes (plan, compression, report, manifest)

PLAN_RECORD = "plan.json"
COMPRESSION_RECORD = "compression.json"  # beside a compressed checkpoint (compress/pipeline.py)
STAGE_RECORD = "stage.json"  # inside each compress stage folder
EXPORT_RECORD = "export.json"  # beside an export (exporters/base.py)
REPORT_RECORD = "report.json"

DEFAULT_DATA = "radiology"  # calibration and evaluation data when none is given
DEFAULT_IMAGE_DATA = "slake"  # the same for a vision-language model (SLAKE train: image + question + answer)


def default_data(vision: bool) -> str:
    """The named data set a stage calibrates on when the user gives none: image QA for a LLaVA, else text."""
    return DEFAULT_IMAGE_DATA if vision else DEFAULT_DATA
EVAL_FRACTION = 0.1  # share of the documents held apart for evaluation when no --eval data is given
