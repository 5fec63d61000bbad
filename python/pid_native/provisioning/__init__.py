"""Provisioning: fetch, verify and assemble the weights a decoder needs into one bundle.

A bundle holds the PiD checkpoint of a latent space, the Gemma-2-2b-it caption encoder and,
optionally, the SDXL VAE (see :mod:`pid_native.provisioning.bundle` for the layout). It comes
from the Hugging Face Hub (:func:`provision`, ``pid-native fetch``) or from weights already
on disk (:func:`build_bundle`), and is checked against its lock file by :func:`verify`
(``pid-native verify``). The Decoder opens it with :func:`load_bundle`.

PiD weights are under the NVIDIA License (NSCLv1): research and evaluation only, and the
restriction extends to every decoded image. They are never downloaded before that licence
is accepted; :func:`licences` lists the weight licences for hosts to display.

Importing this package does not import huggingface_hub; the first download does.
"""

from __future__ import annotations

from .bundle import Bundle, BundleStatus, default_bundle_dir, inspect_bundle, load_bundle
from .install import FetchPlan, PlannedFile, build_bundle, plan, provision
from .licence import licences
from .manifest import Manifest, load_manifest
from .progress import ConsoleProgress, FetchEvent
from .verify import Problem, VerifyReport, verify

__all__ = [
    "Bundle",
    "BundleStatus",
    "ConsoleProgress",
    "FetchEvent",
    "FetchPlan",
    "Manifest",
    "PlannedFile",
    "Problem",
    "VerifyReport",
    "build_bundle",
    "default_bundle_dir",
    "inspect_bundle",
    "licences",
    "load_bundle",
    "load_manifest",
    "plan",
    "provision",
    "verify",
]
