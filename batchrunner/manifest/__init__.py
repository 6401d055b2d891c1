"""YAML -> validated, frozen Job records (pure: text in, jobs or ManifestError out); schema and image checks.

The face of the package: the records and the two ways to make them. Inside, ``parse`` reads the top level and
each job over ``nodes`` (YAML), ``values`` (field checks), ``imagerefs`` (local images resolved and hashed once),
``jobs`` (records, fingerprints, derived ids) and ``matrix`` (the expansion); ``schema`` checks an input against a
model's JSON Schema (with ``schemawords``, ``patterns``, ``schemacache``); ``images`` decodes local images and
probes URLs before anything is paid for; ``localpaths`` judges a local path before anything opens it.
"""

from batchrunner.errors import ManifestError
from batchrunner.manifest.jobs import DEFAULT_MODEL, DEFAULT_VERSION, Job, Manifest
from batchrunner.manifest.parse import ASPECT_RATIOS, DEFAULT_MAX_JOBS, load_manifest, parse_manifest, sha256_file

__all__ = [
    "ASPECT_RATIOS",
    "DEFAULT_MAX_JOBS",
    "DEFAULT_MODEL",
    "DEFAULT_VERSION",
    "Job",
    "Manifest",
    "ManifestError",
    "load_manifest",
    "parse_manifest",
    "sha256_file",
]
