"""Batched generation behind one interface: ``generate(prompts, max_new_tokens, stop) -> completions``.

``TransformersGenerator`` pads on the left (so every row's last prompt token sits at the same position), decodes
greedily by default, stops a row at EOS or when a stop string appears, and cuts the completion before the earliest
stop string: what vLLM returns for the same stop list, so both backends give the same text for the same tokens.
``VllmGenerator`` is used only when ``vllm`` is importable, the model is a folder and a GPU is present.
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Protocol, Sequence

from distmerge.evaluate.answers import truncate_at_stop


class Generator(Protocol):
    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]: ...


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


class TransformersGenerator:
    def __init__(self, model, tokenizer, device: str = "cpu", do_sample: bool = False, temperature: float = 1.0):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.do_sample, self.temperature = do_sample, temperature
        tokenizer.padding_side = "left"

    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        import torch
        from transformers import StoppingCriteriaList

        if not prompts:
            return []
        encoded = self.tokenizer(list(prompts), return_tensors="pt", padding=True).to(self.device)
        prompt_len = encoded["input_ids"].shape[1]
        criteria = StoppingCriteriaList([_StopStrings(self.tokenizer, tuple(stop), prompt_len)]) if stop else None
        sampling = {"do_sample": True, "temperature": self.temperature} if self.do_sample else {
            "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # generation_config sampling fields that greedy decoding ignores
            output = self.model.generate(**encoded, max_new_tokens=max_new_tokens, num_beams=1,
                                         pad_token_id=self.tokenizer.pad_token_id, stopping_criteria=criteria,
                                         **sampling)
        texts = self.tokenizer.batch_decode(output[:, prompt_len:], skip_special_tokens=True)
        return [truncate_at_stop(t, tuple(stop)) for t in texts]


class _StopStrings:
    """Marks a row done once a stop string appears in its completion; only the tail is decoded each step (a stop
    string of n characters spans at most n tokens, so a newly completed one is always inside it)."""

    def __init__(self, tokenizer, stop: tuple[str, ...], prompt_len: int):
        self.tokenizer, self.stop, self.prompt_len = tokenizer, stop, prompt_len
        self.window = max(len(s) for s in stop) + 1

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        generated = input_ids[:, self.prompt_len:]
        tails = self.tokenizer.batch_decode(generated[:, -self.window:], skip_special_tokens=True)
        # generate() keeps a row finished once this returns True for it
        return torch.tensor([any(s in t for s in self.stop) for t in tails], device=input_ids.device)


class VllmGenerator:
    def __init__(self, model_path: str, tokenizer_path: str | None = None, dtype: str = "auto", **llm_options):
        from vllm import LLM

        self.llm = LLM(model=model_path, tokenizer=tokenizer_path or model_path, dtype=dtype, **llm_options)

    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, top_p=1, max_tokens=max_new_tokens, stop=list(stop) or None)
        outputs = self.llm.generate(list(prompts), params, use_tqdm=False)
        return [o.outputs[0].text for o in outputs]
