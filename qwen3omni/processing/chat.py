"""Conversations in the official format: checking them, collecting their media, rendering the chat template.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str | [item, ...]}`
where an item is `{"type": "text", "text": ...}` or `{"type": "audio" | "image" | "video", <type>: value}`
(the value may also be under "path" or "url"; "url" must name a local file). Audio items may carry a
"sampling_rate", video items an "fps" (the rate of the frames the model sees).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime

from ..errors import InputError, describe

MEDIA_KINDS = ("audio", "image", "video")
ROLES = ("system", "user", "assistant")
_PAYLOAD_KEYS = ("path", "url")


@dataclass
class MediaItem:
    """One audio, image or video of a conversation, where it came from, and its options."""

    kind: str
    value: object
    name: str
    options: dict = field(default_factory=dict)


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def _check_item(item, where: str) -> dict:
    if not isinstance(item, dict):
        raise InputError(f"{where}: expected a dict like {{'type': 'text', 'text': ...}}, got {describe(item)}")
    item = _drop_none(item)
    kind = item.get("type")
    if kind == "image_url":  # OpenAI style: {"type": "image_url", "image_url": {"url": ...}}
        url = item.get("image_url")
        item = {"type": "image", "image": url.get("url") if isinstance(url, dict) else url}
        kind = "image"
    if kind == "text":
        if not isinstance(item.get("text"), str):
            raise InputError(f"{where}: a text item needs a string 'text', got {describe(item.get('text'))}")
    elif kind in MEDIA_KINDS:
        payload(item, where)
    else:
        raise InputError(f"{where}: unknown content type {kind!r}; expected one of 'text', 'audio', 'image', 'video'")
    return item


def payload(item: dict, where: str):
    """The medium of a content item: under its type's key, or "path" / "url" (a local file)."""
    kind = item["type"]
    for key in (kind, *_PAYLOAD_KEYS):
        if item.get(key) is not None:
            value = item[key]
            if isinstance(value, str) and value.startswith(("http://", "https://", "data:")):
                raise InputError(f"{where}: URLs and inline data are not fetched; save {value[:40]!r}... to a "
                                 f"local file and pass its path (or pass the decoded array)")
            return value.removeprefix("file://") if isinstance(value, str) else value
    raise InputError(f"{where}: a {kind} item needs its data under {kind!r} (or 'path'), got keys {sorted(item)}")


def _check_message(message, where: str) -> dict:
    if not isinstance(message, dict):
        raise InputError(f"{where}: expected a dict with 'role' and 'content', got {describe(message)}")
    message = _drop_none(message)
    role = message.get("role")
    if role not in ROLES:
        raise InputError(f"{where}: unknown role {role!r}; expected one of {', '.join(map(repr, ROLES))}")
    content = message.get("content", "")
    if isinstance(content, str):
        return {**message, "content": content}
    if not isinstance(content, (list, tuple)):
        raise InputError(f"{where}: 'content' must be a string or a list of items, got {describe(content)}")
    items = [_check_item(item, f"{where}, item {j}") for j, item in enumerate(content)]
    return {**message, "content": items}


def normalize_conversations(conversations) -> tuple[list[list[dict]], bool]:
    """Checked copies of one conversation or a batch of them, and whether a batch was given."""
    if not isinstance(conversations, (list, tuple)) or len(conversations) == 0:
        raise InputError(f"conversations: expected a non-empty list of messages (or of conversations), "
                         f"got {describe(conversations)}")
    batched = isinstance(conversations[0], (list, tuple))
    batch = list(conversations) if batched else [conversations]
    checked = []
    for c, conv in enumerate(batch):
        if not isinstance(conv, (list, tuple)) or len(conv) == 0:
            raise InputError(f"conversation {c}: expected a non-empty list of messages, got {describe(conv)}")
        checked.append([_check_message(m, f"conversation {c}, message {i}") for i, m in enumerate(conv)])
    return checked, batched


def media_items(conversation: list[dict], index: int = 0) -> list[MediaItem]:
    """The media of a checked conversation, in the order the template writes their placeholders."""
    found = []
    for i, message in enumerate(conversation):
        if isinstance(message["content"], str):
            continue
        for j, item in enumerate(message["content"]):
            if item["type"] in MEDIA_KINDS:
                where = f"conversation {index}, message {i}, item {j} ({item['type']})"
                options = {k: item[k] for k in ("sampling_rate", "fps") if k in item}
                found.append(MediaItem(item["type"], payload(item, where), where, options))
    return found


# ---------------------------------------------------------------------------------------------------------------
# Rendering

_PLACEHOLDER_TEXT = {
    "image": "<|vision_start|><|image_pad|><|vision_end|>",
    "video": "<|vision_start|><|video_pad|><|vision_end|>",
    "audio": "<|audio_start|><|audio_pad|><|audio_end|>",
}


def _item_text(item: dict) -> str:
    return item["text"] if item["type"] == "text" else _PLACEHOLDER_TEXT[item["type"]]


def _content_text(content) -> str:
    return content if isinstance(content, str) else "".join(_item_text(item) for item in content)


def render_builtin(conversation: list[dict], add_generation_prompt: bool = True) -> str:
    """The prompt the official Qwen3-Omni template writes for system / user / assistant conversations.

    ChatML turns; media become their placeholder runs in place. A leading system message with list content
    gets one system turn per item, as the official template does. Assistant turns are written as given: none
    of the Thinking template's <think> rules (an empty think block before a final assistant turn, think blocks
    stripped from earlier turns, `reasoning_content`) is applied, so for assistant turns it matches the
    Thinking template only where those rules change nothing. Folders that ship a template use their own.
    """
    turns = []
    body = conversation
    if conversation[0]["role"] == "system":
        content = conversation[0]["content"]
        texts = [content] if isinstance(content, str) else [_item_text(item) for item in content]
        turns += [f"<|im_start|>system\n{text}<|im_end|>\n" for text in texts]
        body = conversation[1:]
    for message in body:
        turns.append(f"<|im_start|>{message['role']}\n{_content_text(message['content'])}<|im_end|>\n")
    if add_generation_prompt:
        turns.append("<|im_start|>assistant\n")
    return "".join(turns)


def _raise_template_error(message):
    raise InputError(f"chat template: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_template(source: str):
    """A jinja chat template compiled in a sandbox, with the helpers Hugging Face templates expect."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise InputError(f"chat template: not a valid jinja template (line {e.lineno}: {e.message})") from None


def render_template(template, conversation: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
    """Render a compiled jinja template for one checked conversation."""
    import jinja2

    try:
        return template.render(messages=conversation, add_generation_prompt=add_generation_prompt, **kwargs)
    except jinja2.TemplateError as e:
        raise InputError(f"chat template: rendering failed: {e}") from None
