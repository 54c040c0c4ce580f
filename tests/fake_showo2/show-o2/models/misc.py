"""Fake of show-o2/models/misc.py: a word-hashing tokenizer read from a directory, and prepare_gen_input."""
import json
import os

import torch


class FakeTokenizer:
    """Words -> ids in [16, vocab_size) by a byte-sum hash; ids below 16 are special tokens."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size
        self.pad_token_id = 0
        self.eos_token_id = 1

    def __len__(self):
        return self.vocab_size

    def __call__(self, text, add_special_tokens=False):
        ids = [16 + sum(w.encode()) % (self.vocab_size - 16) for w in text.lower().split()]
        return {"input_ids": ids}


def get_text_tokenizer(model_path, add_showo_tokens=True, return_showo_token_ids=False, llm_name="qwen2_5"):
    """Reads ``fake_tokenizer.json`` ({"vocab_size": V}) in ``model_path``; OSError if absent (as HF does)."""
    path = os.path.join(str(model_path), "fake_tokenizer.json")
    if not os.path.isfile(path):
        raise OSError(f"Can't load tokenizer for '{model_path}'")
    tok = FakeTokenizer(json.load(open(path))["vocab_size"])
    ids = {"bos_id": 2, "eos_id": 1, "boi_id": 3, "eoi_id": 4, "bov_id": 5, "eov_id": 6,
           "img_pad_id": 7, "vid_pad_id": 8, "img_id": 9}
    return (tok, ids) if return_showo_token_ids else tok


def prepare_gen_input(prompts, text_tokenizer, num_image_tokens, bos_id, eos_id, boi_id, eoi_id, pad_id, img_pad_id,
                      max_text_len, device):
    """[bos] text [boi] img_pad * N [eoi] [eos] pad...; modality position (len(text) + 2, N); same for ''."""
    def one(text_tokens):
        pos = torch.tensor([len(text_tokens) + 1 + 1, num_image_tokens]).unsqueeze(0)
        seq = [bos_id] + text_tokens + [boi_id] + [img_pad_id] * num_image_tokens + [eoi_id] + [eos_id] \
            + [pad_id] * (max_text_len - len(text_tokens))
        return torch.tensor(seq), pos

    toks, poss, toks0, poss0 = [], [], [], []
    for prompt in prompts:
        t, p = one(text_tokenizer(prompt, add_special_tokens=False)["input_ids"][:max_text_len])
        t0, p0 = one([])
        toks.append(t), poss.append(p), toks0.append(t0), poss0.append(p0)
    return (torch.stack(toks).to(device), torch.stack(toks0).to(device),
            torch.stack(poss).to(device), torch.stack(poss0).to(device))
