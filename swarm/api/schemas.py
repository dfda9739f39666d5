"""Request bodies of the OpenAI-compatible endpoints, validated with pydantic, and the gateway's request limits.

Types are strict as in OpenAI's API ("5" is not an integer, 5.0 is not either). Unknown fields are ignored, so
clients that send newer parameters still work; known parameters this gateway cannot honour (penalties, logprobs,
tools...) are refused with a 400 that names them rather than silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_STRINGS = 4  # as OpenAI


@dataclass(frozen=True)
class Limits:
    max_tokens: int = 2048  # largest max_tokens a request may ask for (per choice)
    max_prompt_tokens: int = 4096  # longest prompt, in tokens (each prompt of a batch)
    max_n: int = 8  # most choices per prompt
    max_batch: int = 16  # most prompts in one completions request


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False  # a last chunk with no choices and the request's usage, as OpenAI's


class GenerationRequest(_Body):
    """What both endpoints share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)  # None: completions 16 (as OpenAI), chat up to the limit
    temperature: float = Field(1.0, ge=0, le=2)  # 0: greedy
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)  # choices per prompt
    # Up to 4 strings; the text ends before the first one generated. Validated into a list, None into [].
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # same seed and parameters: same text
    stream: bool = False  # server-sent events, one chunk per piece of text, then "data: [DONE]"
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as an end-user id is
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens whatever the model says
    # Known parameters this gateway cannot honour: refused unless left at their defaults.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(not string for string in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("penalties are not supported by this gateway; leave it at 0")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict | None) -> None:
        if value:
            raise ValueError("logit_bias is not supported by this gateway")
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


Prompt = str | list[str] | list[Annotated[int, Field(ge=0)]] | list[list[Annotated[int, Field(ge=0)]]]


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions``."""

    prompt: Prompt  # a text, several texts, token ids, or several lists of token ids
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("echo", "suffix")
    @classmethod
    def _unsupported(cls, value: object) -> object:
        if value:
            raise ValueError("not supported by this gateway")
        return value

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("best_of is not supported by this gateway; ask for n choices instead")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> None:
        if value is not None:
            raise ValueError("logprobs are not supported by this gateway")
        return None

    def prompts(self) -> list[str] | list[list[int]]:
        """The request's prompts as a batch: texts or lists of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and isinstance(prompt[0], int):
            return [prompt]
        return list(prompt)


class TextPart(_Body):
    type: Literal["text"]  # images and audio are not supported
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: str | list[TextPart] | None = None  # None: only for an assistant message (as OpenAI)
    name: str | None = None
    tool_calls: list[Any] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: object) -> object:
        # checked first: the union's own error would only say that content "should be a valid string"
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") != "text":
                    raise ValueError(f"only text content parts are supported by this gateway, got "
                                     f"{part.get('type')!r}")
        return content

    @field_validator("tool_calls")
    @classmethod
    def _no_tool_calls(cls, value: list | None) -> None:
        if value:
            raise ValueError("tool calls are not supported by this gateway")
        return None

    @model_validator(mode="after")
    def _content_unless_assistant(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(GenerationRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens; wins if both
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None  # the older form of tools
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("logprobs", "top_logprobs", "tools", "tool_choice", "functions", "function_call",
                     "parallel_tool_calls")
    @classmethod
    def _unsupported(cls, value: object) -> object:
        if value:
            raise ValueError("not supported by this gateway")
        return value

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict | None) -> dict | None:
        if value and value.get("type") != "text":
            raise ValueError('only {"type": "text"} is supported by this gateway')
        return value

    def conversation(self) -> list[dict[str, str]]:
        """The messages as chat templates take them."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


FIELD_NAMES = frozenset(name for cls in (CompletionRequest, ChatCompletionRequest, ChatMessage, TextPart,
                                         StreamOptions) for name in cls.model_fields)
