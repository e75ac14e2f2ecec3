"""Where dataset bytes come from: a multipart upload, a raw JSONL body, or a server-side path.

Multipart bodies are parsed here with the standard library (split on the boundary, headers via
``email``) rather than through Starlette's form parser, which needs the optional
``python-multipart`` package. The body is already fully buffered and bounded by the body-size
middleware, so a simple split is enough.

Server-side paths are confined to ``dataset_roots``: the path (absolute, or relative to each root)
is resolved with symlinks followed, and must land inside a root. A path outside every root is
refused with 403 without looking at whether it exists, so the endpoint cannot probe the disk.
"""

from __future__ import annotations

import email.message
import email.parser
import email.policy
from dataclasses import dataclass, field
from pathlib import Path

from services.api.errors import ApiError


@dataclass
class Multipart:
    fields: dict[str, list[str]] = field(default_factory=dict)
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)


def _header_params(header_block: str) -> email.message.Message:
    parser = email.parser.HeaderParser(policy=email.policy.compat32)
    return parser.parsestr(header_block)


def parse_multipart(body: bytes, content_type: str) -> Multipart:
    headers = _header_params(f"Content-Type: {content_type}\r\n\r\n")
    boundary = headers.get_param("boundary")
    if not isinstance(boundary, str) or not boundary or len(boundary) > 200:
        raise ApiError(400, "malformed_multipart", "multipart body without a valid boundary")
    delimiter = b"--" + boundary.encode("latin-1")
    pieces = body.split(delimiter)
    if len(pieces) < 3 or not pieces[-1].startswith(b"--"):
        raise ApiError(400, "malformed_multipart", "multipart body is not terminated")
    out = Multipart()
    for piece in pieces[1:-1]:
        if piece.startswith(b"\r\n"):
            piece = piece[2:]
        elif piece.startswith(b"\n"):
            piece = piece[1:]
        if piece.endswith(b"\r\n"):
            piece = piece[:-2]
        elif piece.endswith(b"\n"):
            piece = piece[:-1]
        head, sep, content = piece.partition(b"\r\n\r\n")
        if not sep:
            head, sep, content = piece.partition(b"\n\n")
        if not sep:
            raise ApiError(400, "malformed_multipart", "a multipart part has no header block")
        part = _header_params(head.decode("latin-1") + "\r\n\r\n")
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "malformed_multipart", "a multipart part has no name")
        filename = part.get_param("filename", header="content-disposition")
        if isinstance(filename, str) or name == "file":
            out.files[name] = (filename if isinstance(filename, str) else name, content)
        else:
            try:
                text = content.decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError(
                    400, "malformed_multipart", f"form field {name!r} is not UTF-8"
                ) from None
            out.fields.setdefault(name, []).append(text)
    return out


def resolve_path(raw: str, roots: list[Path]) -> Path:
    if not roots:
        raise ApiError(
            403,
            "path_loading_disabled",
            "server-side dataset paths are disabled: the api has no dataset_roots configured",
        )
    if "\x00" in raw or not raw.strip():
        raise ApiError(422, "invalid_path", "the dataset path is empty or contains a NUL byte")
    given = Path(raw)
    candidates = [given] if given.is_absolute() else [root / given for root in roots]
    resolved_roots = []
    for root in roots:
        try:
            resolved_roots.append(root.resolve())
        except (OSError, RuntimeError):
            continue
    inside: list[Path] = []
    for candidate in candidates:
        try:
            real = candidate.resolve()
        except (OSError, RuntimeError, ValueError):
            continue
        if any(real.is_relative_to(root) for root in resolved_roots):
            inside.append(real)
    if not inside:
        raise ApiError(
            403, "path_not_allowed", "the dataset path is outside every configured dataset root"
        )
    for real in inside:
        if real.is_file():
            return real
    raise ApiError(404, "file_not_found", f"no dataset file {raw!r} under the dataset roots")
