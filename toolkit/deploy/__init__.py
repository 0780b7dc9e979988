"""`bedside deploy` and `bedside verify`: plan -> compress -> export -> validate -> report + bundle, and the check of a bundle.

Modules: `pipeline` (orchestration, resume, re-plan loop), `preflight` (bad input before any work),
`validate` (PASS/FAIL checks against the profile), `replan` (the next candidate from measurements),
`report` (report.json + report.html), `bundle` (folder + .tar.gz + manifest.json), `verify`.
"""

from toolkit.deploy.pipeline import DeployOptions, DeployResult, run_deploy
from toolkit.validate.checks import Check

__all__ = ["Check", "DeployOptions", "DeployResult", "run_deploy"]
