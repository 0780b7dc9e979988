"""`bedside deploy` and `bedside verify`: plan -> compress -> export -> validate -> report + bundle, and the check of a bundle.

Modules: `pipeline` (orchestration, resume, re-plan loop), `preflight` (bad input before any work),
`outcome` (the typed result pipeline hands to report and bundle), `report` (report.json + report.html),
`bundle` (folder + .tar.gz + manifest.json), `verify`. The checks and the re-plan live in `toolkit.validate`.
"""

from toolkit.deploy.outcome import Attempt, DeployOutcome
from toolkit.deploy.pipeline import DeployOptions, DeployResult, run_deploy
from toolkit.validate.checks import Check

__all__ = ["Attempt", "Check", "DeployOptions", "DeployOutcome", "DeployResult", "run_deploy"]
