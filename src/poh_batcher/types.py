"""Public data types: one ACK, and one packed (compressed) batch of them.

``AckItem`` is the pydantic model for code that builds or inspects ACKs one at a
time. The hot path of the command does not build models (see ``_parsing``); it
validates raw lines to the same rules and keeps their bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field, field_validator

Codec = Literal["zstd", "gzip", "none"]
_Rfc3339 = Annotated[datetime, msgspec.Meta(tz=True)]


class AckItem(BaseModel):
    """One acknowledgement. Extra fields are allowed and kept, in order.

    ``timestamp`` stays the string that was received (the archive keeps what came
    in, byte for byte) but must parse as RFC 3339 with a ``Z`` or an offset.
    """

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    id: str = Field(min_length=1)
    timestamp: str = Field(min_length=1)
    signature: str = Field(min_length=1)
    pubkey: str = Field(min_length=1)

    @field_validator("timestamp")
    @classmethod
    def _rfc3339_with_zone(cls, value: str) -> str:
        # The same rule as the line validator (parsing.py), so that every ACK the
        # command archives unpacks as an AckItem and every AckItem can be archived.
        try:
            msgspec.convert(value, _Rfc3339)
        except msgspec.ValidationError:
            raise ValueError(f"timestamp {value!r} is not an RFC 3339 time with a 'Z' or an offset") from None
        return value


AckRequest = AckItem
"""The same type under the name used by the upstream ``poh_ack`` package."""


@dataclass(frozen=True, slots=True)
class BatchHeader:
    """What a reader needs to know about a batch before decompressing it."""

    count: int
    compression: Codec


@dataclass(frozen=True, slots=True)
class PackedBatch:
    """A batch ready to store: its header and the compressed JSON array."""

    header: BatchHeader
    payload: bytes = field(repr=False)
