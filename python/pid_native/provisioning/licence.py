"""Weight licences: machine-readable records, the acceptance gate and its record.

PiD weights are under the NVIDIA License (NSCLv1): research and evaluation only, and the
restriction extends to every image decoded with them. pid-native never downloads them
until that licence has been accepted, either explicitly (``accept_license=True``,
``pid-native fetch --accept-license``) or at an interactive prompt when stdin is a
terminal. The Gemma Terms of Use of the caption encoder are shown and accepted with it.
The acceptance (licence ids and versions, time, how) is recorded in the bundle.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ..errors import LicenseError


class Licence(BaseModel):
    """A weight licence as hosts display it (the fields of SceneWorks' ``WeightLicense``, plus context).

    Attributes:
        id: stable identifier (an SPDX id where one exists).
        name: human-readable name.
        version: the licence version accepted, where the licence is versioned.
        url: where to read it.
        commercial_use: whether the weights, and what they produce, may be used commercially.
        restriction: what users must observe; always set when ``commercial_use`` is false.
        attribution: the notice to show with the weights or their outputs.
        components: the bundle components it covers.
        summary: short bullet points shown before acceptance.
        requires_acceptance: downloading is refused until this licence is accepted.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    name: str
    version: str | None
    url: str
    commercial_use: bool
    restriction: str | None
    attribution: str
    components: tuple[str, ...]
    summary: tuple[str, ...]
    requires_acceptance: bool

    def record(self) -> dict[str, Any]:
        """The record hosts list: id, name, url, commercial_use, restriction, attribution, components."""
        return self.model_dump(
            mode="json",
            include={"id", "name", "url", "commercial_use", "restriction", "attribution", "components"},
        )


LICENCES: dict[str, Licence] = {
    lic.id: lic
    for lic in (
        Licence(
            id="NSCLv1",
            name="NVIDIA License (NSCLv1), non-commercial",
            version="1",
            url="https://huggingface.co/nvidia/PiD",
            commercial_use=False,
            restriction=(
                "Research and evaluation use only; no commercial use. The restriction extends to every "
                "image decoded or upscaled with these weights."
            ),
            attribution="PiD (Pixel diffusion Decoder) by NVIDIA, https://github.com/nv-tlabs/PiD",
            components=("pid",),
            summary=(
                "research and evaluation use only; no commercial use",
                "the restriction applies to every image decoded or upscaled with PiD",
                "licence text: the NVIDIA License on https://huggingface.co/nvidia/PiD; the safetensors "
                "conversion is re-hosted by SceneWorks under the same licence",
            ),
            requires_acceptance=True,
        ),
        Licence(
            id="gemma",
            name="Gemma Terms of Use",
            version=None,
            url="https://ai.google.dev/gemma/terms",
            commercial_use=True,
            restriction=(
                "Use must follow the Gemma Prohibited Use Policy "
                "(https://ai.google.dev/gemma/prohibited_use_policy); redistribution must pass on the "
                "Gemma Terms of Use."
            ),
            attribution="Gemma is provided under and subject to the Gemma Terms of Use found at "
            "ai.google.dev/gemma/terms",
            components=("gemma",),
            summary=(
                "Gemma-2-2b-it (the caption encoder) is under the Gemma Terms of Use",
                "use must follow the Gemma Prohibited Use Policy",
            ),
            requires_acceptance=True,
        ),
        Licence(
            id="sdxl-vae",
            name="MIT (as declared on the stabilityai/sdxl-vae model card)",
            version=None,
            url="https://huggingface.co/stabilityai/sdxl-vae",
            commercial_use=True,
            restriction=None,
            attribution="SDXL VAE by Stability AI, https://huggingface.co/stabilityai/sdxl-vae",
            components=("vae",),
            summary=("the SDXL VAE (image upscaling only) is under its model card's licence",),
            requires_acceptance=False,
        ),
        Licence(
            id="sdxl-vae-fp16-fix",
            name="MIT (as declared on the madebyollin/sdxl-vae-fp16-fix model card)",
            version=None,
            url="https://huggingface.co/madebyollin/sdxl-vae-fp16-fix",
            commercial_use=True,
            restriction=None,
            attribution="SDXL-VAE-FP16-Fix by madebyollin, based on the SDXL VAE by Stability AI",
            components=("vae",),
            summary=("the fp16-fix SDXL VAE (image upscaling only) is under its model card's licence",),
            requires_acceptance=False,
        ),
    )
}


def licences() -> list[dict[str, Any]]:
    """Machine-readable records of every weight licence pid-native may fetch, for hosts to list.

    Each record has ``id``, ``name``, ``url``, ``commercial_use``, ``restriction`` (set whenever
    ``commercial_use`` is false), ``attribution`` and ``components``.
    """
    return [lic.record() for lic in LICENCES.values()]


class AcceptedLicence(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    version: str | None


class Acceptance(BaseModel):
    """The record of a licence acceptance, stored in ``pid-bundle.json`` under ``license``.

    Attributes:
        licences: the licences accepted, with their versions.
        accepted_at: when, ISO 8601 in UTC.
        method: ``argument`` (``accept_license=True`` or ``--accept-license``) or ``prompt``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    licences: tuple[AcceptedLicence, ...]
    accepted_at: str
    method: Literal["argument", "prompt"]

    def covers(self, ids: Iterable[str]) -> bool:
        """Whether every licence in ``ids`` was accepted at its current version."""
        accepted = {(a.id, a.version) for a in self.licences}
        return all((i, LICENCES[i].version) in accepted for i in ids)


def gated_licences(ids: Iterable[str]) -> list[Licence]:
    """The licences among ``ids`` that must be accepted before downloading, in a stable order."""
    return [LICENCES[i] for i in sorted(set(ids)) if LICENCES[i].requires_acceptance]


def notice(ids: Iterable[str]) -> str:
    """The text shown before acceptance: each licence's summary and link."""
    lines = ["The weights pid-native is about to download come with these licences:"]
    for lic in (LICENCES[i] for i in sorted(set(ids))):
        lines.append(f"  {lic.name} ({lic.url})")
        lines.extend(f"    - {point}" for point in lic.summary)
    return "\n".join(lines)


def require_acceptance(ids: Iterable[str], accept: bool) -> Acceptance:
    """Accept the licences among ``ids`` that need it, or refuse.

    With ``accept`` true the acceptance is recorded as given. Otherwise, when stdin is a
    terminal, the notice is shown on stderr and the user is asked; anything but ``y``/``yes``
    refuses.

    Raises:
        LicenseError: not accepted (code ``license_not_accepted``); the message carries the
            notice and how to accept.
    """
    ids = sorted(set(ids))
    needed = gated_licences(ids)
    if accept:
        return _acceptance(needed, "argument")
    text = notice(ids)
    if sys.stdin is not None and sys.stdin.isatty():
        print(text, file=sys.stderr)
        print("Accept these licences and download? [y/N] ", end="", file=sys.stderr, flush=True)
        if sys.stdin.readline().strip().lower() in ("y", "yes"):
            return _acceptance(needed, "prompt")
    names = " and ".join(lic.name for lic in needed)
    raise LicenseError(
        f"{names} not accepted; nothing was downloaded.\n{text}\n"
        "To accept, pass accept_license=True (Python) or --accept-license (pid-native fetch).",
        "license_not_accepted",
    )


def _acceptance(needed: list[Licence], method: Literal["argument", "prompt"]) -> Acceptance:
    return Acceptance(
        licences=tuple(AcceptedLicence(id=lic.id, version=lic.version) for lic in needed),
        accepted_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        method=method,
    )


__all__ = [
    "LICENCES",
    "Acceptance",
    "AcceptedLicence",
    "Licence",
    "gated_licences",
    "licences",
    "notice",
    "require_acceptance",
]
