"""Turning requests into token ids within the gateway's limits: completion prompts as they are, chat conversations
through the tokenizer's chat template."""

from __future__ import annotations

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from swarm.api.errors import APIError
from swarm.api.schemas import ChatCompletionRequest, CompletionRequest, Limits

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


class PromptBuilder:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, limits: Limits, context_length: int | None):
        self.tokenizer, self.limits = tokenizer, limits
        self.context_length = context_length  # positions the model handles (max_position_embeddings); None: any

    def completion_prompts(self, request: CompletionRequest) -> list[list[int]]:
        """Each prompt of the request as token ids (texts tokenized as the model's tokenizer does by default)."""
        prompts = request.prompts()
        if not prompts:
            raise APIError(400, "Invalid 'prompt': empty list", param="prompt")
        if len(prompts) > self.limits.max_batch:
            raise APIError(400, f"Invalid 'prompt': at most {self.limits.max_batch} prompts per request, got "
                                f"{len(prompts)}", param="prompt")
        vocab = len(self.tokenizer)
        token_ids = []
        for prompt in prompts:
            if isinstance(prompt, str):
                prompt = self.tokenizer(prompt)["input_ids"]
            elif any(token >= vocab for token in prompt):
                raise APIError(400, f"Invalid 'prompt': token ids must be below the vocabulary size {vocab}",
                               param="prompt")
            token_ids.append(self._check_length(list(prompt), "prompt"))
        return token_ids

    def chat_prompt(self, request: ChatCompletionRequest) -> list[int]:
        """The conversation through the chat template, ending with the assistant's turn to speak."""
        if self.tokenizer.chat_template is None:
            raise APIError(400, "This model's tokenizer has no chat template; use /v1/completions",
                           param="messages")
        try:
            encoded = self.tokenizer.apply_chat_template(request.conversation(), add_generation_prompt=True,
                                                         tokenize=True, return_dict=True)
        except TemplateError as e:  # templates refuse some conversations, e.g. roles that do not alternate
            raise APIError(400, f"Invalid 'messages': the chat template refused them: {e}", param="messages") from e
        return self._check_length(list(encoded["input_ids"]), "messages")

    def max_new_tokens(self, requested: int | None, prompt_lengths: list[int], default: int | None) -> int:
        """The number of tokens to generate: as requested if within the limits, else a 400; if not requested,
        ``default`` (None: as many as the limit and the context allow)."""
        longest = max(prompt_lengths)
        room = self.context_length - longest if self.context_length is not None else self.limits.max_tokens
        if requested is None:
            requested = min(default or self.limits.max_tokens, max(room, 1))
        elif requested > self.limits.max_tokens:
            raise APIError(400, f"Invalid 'max_tokens': at most {self.limits.max_tokens} tokens per request on this "
                                f"gateway, got {requested}", param="max_tokens")
        if requested > room:
            raise APIError(400, f"This model's maximum context length is {self.context_length} tokens. However, you "
                                f"requested {longest + requested} tokens ({longest} in the prompt, {requested} in the "
                                f"completion). Please reduce the prompt or the completion length.",
                           param="max_tokens", code="context_length_exceeded")
        return requested

    def _check_length(self, token_ids: list[int], param: str) -> list[int]:
        if not token_ids:
            raise APIError(400, f"Invalid '{param}': the prompt is empty", param=param)
        if len(token_ids) > self.limits.max_prompt_tokens:
            raise APIError(400, f"Invalid '{param}': the prompt has {len(token_ids)} tokens; this gateway accepts "
                                f"at most {self.limits.max_prompt_tokens}", param=param, code="prompt_too_long")
        return token_ids
