"""OpenAI chat messages -> one CoordExp request: the image's bytes and the prompt parts it sets.

Accepted: an optional system message (a string or text parts) and one user message whose content
holds text parts and exactly one image part (`image_url` with a `data:` URL of a PNG, JPEG or WebP;
an `http(s)` URL only for hosts on the server's allow-list). The order of the parts is kept: text
before the image is sent as `message_layout: text_first`, after it as `image_first` (the chat template
renders consecutive text parts joined, so several parts on one side are one text). Text on both
sides of the image cannot be expressed and is refused, never reordered. Without a system message,
or without user text, the repository's own texts are used.
"""
from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Sequence

from coordexp.generation import RequestPrompt
from coordexp.serving.openai_api.protocol import OpenAIError, bad_request

IMAGE_MIME = {"image/png", "image/jpeg", "image/jpg", "image/webp"}
_DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[\w.+-]+)*);base64,(.*)$", re.S | re.I)


@dataclass
class ChatInput:
    prompt: RequestPrompt
    image: bytes
    width: int
    height: int


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int
    allowed_hosts: tuple[str, ...] = ()  # image URL hosts the server may fetch from (none by default)
    fetch_timeout_s: float = 10.0


def _text_of(content: Any, where: str) -> str:
    """A system message's content: a string or text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"{where}.content[{i}]: only text parts are allowed here", "messages")
            out.append(part["text"])
        return "".join(out)
    raise bad_request(f"{where}.content must be a string or a list of text parts", "messages")


def split_messages(messages: Sequence[Any]) -> tuple[str | None, list[Any]]:
    """(system text or None, the user message's content parts); OpenAIError for anything else."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    system: str | None = None
    user: list[Any] | None = None
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object", "messages")
        role = m.get("role")
        if role in ("system", "developer"):
            if system is not None or user is not None:
                raise bad_request(f"{where}: one system message, before the user message", "messages")
            system = _text_of(m.get("content"), where)
        elif role == "user":
            if user is not None:
                raise bad_request(f"{where}: one user message per request (no multi-turn conversations)", "messages")
            content = m.get("content")
            user = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(user, list):
                raise bad_request(f"{where}.content must be a string or a list of parts", "messages")
        elif role in ("assistant", "tool", "function"):
            raise bad_request(f"{where}: role {role!r}: multi-turn conversations are not supported; send a system "
                              "message (optional) and one user message with the image", "messages")
        else:
            raise bad_request(f"{where}: unknown role {role!r}", "messages")
    if user is None:
        raise bad_request("no user message: send one user message holding the image", "messages")
    return system, user


def _image_url(part: dict[str, Any], where: str) -> str:
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise bad_request(f"{where}: image_url needs a url", "messages")
    return url


def read_data_url(url: str, limits: ImageLimits, where: str) -> bytes:
    m = _DATA_URL.match(url)
    if not m:
        raise bad_request(f"{where}: a data URL must read data:image/<png|jpeg|webp>;base64,<data>", "messages",
                          "invalid_image_url")
    mime = (m.group(1) or "").lower()
    if mime not in IMAGE_MIME:
        raise bad_request(f"{where}: media type {mime or '(none)'!r} is not an image this server takes "
                          "(image/png, image/jpeg, image/webp)", "messages", "unsupported_media_type")
    data = m.group(3)
    if len(data) * 3 // 4 > limits.max_bytes:
        raise OpenAIError(413, f"{where}: the image is larger than {limits.max_bytes >> 20} MiB",
                          code="image_too_large")
    try:
        return base64.b64decode(re.sub(r"\s+", "", data), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{where}: the data URL's base64 does not decode", "messages", "invalid_base64") from None


def fetch_url(url: str, limits: ImageLimits, where: str) -> bytes:
    """An http(s) image from an allow-listed host (none by default: no server-side fetching)."""
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    if host not in limits.allowed_hosts:
        hint = (" (this server fetches from no host: start it with --allow-image-host HOST to allow one)"
                if not limits.allowed_hosts else f" (allowed: {', '.join(limits.allowed_hosts)})")
        raise bad_request(f"{where}: image URLs are not fetched from {host or url!r}{hint}; send the image as a "
                          "data: URL (base64)", "messages", "image_url_not_allowed")
    try:
        with urllib.request.urlopen(url, timeout=limits.fetch_timeout_s) as r:  # noqa: S310 - allow-listed
            data = r.read(limits.max_bytes + 1)
    except Exception as e:  # noqa: BLE001 - any failure is this request's
        raise bad_request(f"{where}: cannot fetch {url}: {e}", "messages", "image_fetch_failed") from None
    if len(data) > limits.max_bytes:
        raise OpenAIError(413, f"{where}: the image is larger than {limits.max_bytes >> 20} MiB", code="image_too_large")
    return data


def chat_input(messages: Sequence[Any], limits: ImageLimits) -> ChatInput:
    """The request's image and prompt parts; OpenAIError naming the message and the problem."""
    from coordexp.dataset import check_image_bytes
    from coordexp.schema import ContractError

    system, parts = split_messages(messages)
    before: list[str] = []
    after: list[str] = []
    image: bytes | None = None
    for i, part in enumerate(parts):
        where = f"user content[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad_request(f"{where}: text must be a string", "messages")
            (before if image is None else after).append(part["text"])
        elif kind in ("image_url", "input_image"):
            if image is not None:
                raise bad_request(f"{where}: a second image: a CoordExp model takes exactly one image per request",
                                  "messages", "too_many_images")
            url = _image_url(part, where)
            image = read_data_url(url, limits, where) if url.startswith("data:") else (
                fetch_url(url, limits, where) if url.startswith(("http://", "https://"))
                else _raise(bad_request(f"{where}: unsupported image URL scheme", "messages", "invalid_image_url")))
        else:
            raise bad_request(f"{where}: part type {kind!r} is not supported (text, image_url)", "messages")
    if image is None:
        raise bad_request("no image: the user message needs exactly one image_url part", "messages", "missing_image")
    if "".join(before).strip() and "".join(after).strip():
        raise bad_request("text on both sides of the image: put the user text before or after the image (the "
                          "order is kept as sent, never changed)", "messages", "unsupported_layout")
    try:
        width, height = check_image_bytes(image, "image", limits.max_pixels)
    except ContractError as e:
        raise bad_request(f"{e.code}: {e.message}", "messages", str(e.code)) from None
    text_before, text_after = "".join(before), "".join(after)
    if text_before.strip():
        prompt = RequestPrompt(user_text=text_before, layout="text_first")
    elif text_after.strip():
        prompt = RequestPrompt(user_text=text_after, layout="image_first")
    else:
        prompt = RequestPrompt()
    if system is not None and system.strip():
        prompt = RequestPrompt(prompt.user_text, system, prompt.layout)
    return ChatInput(prompt, image, width, height)


def _raise(e: Exception):
    raise e
