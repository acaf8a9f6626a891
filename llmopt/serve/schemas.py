"""OpenAI request bodies, validated strictly: an unknown field or an out-of-range value is a 422 naming it."""

from __future__ import annotations

from dataclasses import replace
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmopt.runtime.sampling import SamplingParams


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Generation(_Strict):
    """The fields /v1/completions and /v1/chat/completions share."""

    model: str
    max_tokens: Optional[int] = Field(None, ge=1, description="default: 16 (completions), what fits (chat)")
    # unset sampling fields take the engine's generation config defaults, as `llmopt generate` does
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0, description="0: greedy")
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=0, description="extension: 0 is no limit")
    repetition_penalty: Optional[float] = Field(None, gt=0.0, le=10.0, description="extension: 1 is none")
    seed: Optional[int] = None
    ignore_eos: bool = Field(False, description="extension: always generate max_tokens (load tests)")
    stop: Optional[Union[str, list[str]]] = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # OpenAI fields some clients send at their neutral values; anything else is refused, not ignored
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    logprobs: Optional[Union[bool, int]] = None

    @field_validator("frequency_penalty", "presence_penalty", "logit_bias", "logprobs")
    @classmethod
    def _neutral(cls, v: object, info) -> object:  # noqa: ANN001
        if v:
            raise ValueError(f"{info.field_name} is not supported by llmopt serve; omit it"
                             + (" (or send 0)" if "penalty" in info.field_name else ""))
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Optional[Union[str, list[str]]]) -> Optional[Union[str, list[str]]]:
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return v

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self, defaults: SamplingParams = SamplingParams()) -> SamplingParams:
        given = {k: getattr(self, k) for k in ("temperature", "top_k", "top_p", "repetition_penalty", "seed")
                 if getattr(self, k) is not None}
        return replace(defaults, **given)


class CompletionRequest(_Generation):
    prompt: Union[str, list[str], list[int]]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Union[str, list[str], list[int]]) -> Union[str, list[str], list[int]]:
        if isinstance(v, list) and v and isinstance(v[0], str) and len(v) != 1:
            raise ValueError(f"{len(v)} prompts given; this server takes one prompt per request")
        if isinstance(v, list) and not v:
            raise ValueError("the prompt is empty")
        return v


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="the newer name of max_tokens")

    @property
    def limit(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens
