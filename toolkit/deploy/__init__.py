"""`bedside deploy` and `bedside verify`: plan -> compress -> export -> validate -> report + bundle, and the check of a bundle.

Modules: `pipeline` (orchestration, resume, re-plan loop), `preflight` (bad input before any work),
`outcome` (the typed result pipeline hands to report and bundle), `report` (report.json + report.html),
`bundle` (folder + .tar.gz + manifest.json), `verify`. The checks and the re-plan live in `toolkit.validate`.

Importing the package imports nothing: `verify` runs on a target without the build toolchain (torch),
which `pipeline` needs.
"""
