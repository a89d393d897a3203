"""The self-judge: M_t scores a sample's prompt and response 0-10 on three dimensions (6 judgements).

Shared by the diagnosis stage (quality axis) and the Serve app's ``/v1/judge`` route, so a rewrite is
re-judged exactly as its original was diagnosed. Two ways to get a score:

- probability-weighted (:func:`judge_scores`): the expected 0-10 score under the model's next-token
  distribution after the judge prompt, one forward pass, no generated text parsed; the three judgements
  of a target share the sample's body, computed once and reused through the KV cache;
- generated (:func:`judge_generate`): the paper's way, generate at temperature 0.1 and parse a leading
  number; an answer without one is missing (NaN), never 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from middo_ray.encode import render_prompt
from middo_ray.prompts import judge_body, judge_tail
from middo_ray.schema import JUDGE_DIMENSIONS
from middo_ray.scoring import length_batches
from middo_ray.signals.quality import expected_score

# The six judgement columns: prompt x (factuality, clarity, completeness), then response x the same.
JUDGE_COLUMNS = tuple(f"q_{t}_{d}" for t in ("prompt", "response") for d in JUDGE_DIMENSIONS)



@dataclass
class ScoreTokens:
    digits: list[int]               # ids of "0".."9"
    ten: int | None = None          # id of a single "10" token, if the tokenizer has one
    two_step_ten: bool = False      # "10" is spelled "1","0"


def score_tokens(tokenizer) -> ScoreTokens:
    """Token ids of the score answers; fails clearly for tokenizers that split a digit."""
    digits = []
    for d in range(10):
        ids = tokenizer(str(d), add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"the tokenizer splits the digit '{d}' into {ids}; the probability-weighted "
                             "judge needs single-token digits")
        digits.append(ids[0])
    ten = tokenizer("10", add_special_tokens=False)["input_ids"]
    if len(ten) == 1:
        return ScoreTokens(digits, ten=ten[0])
    return ScoreTokens(digits, two_step_ten=(ten == [digits[1], digits[0]]))


def judge_sequences(rows: list[dict], tokenizer, template: str, cutoff_len: int, target: str
                    ) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of the shared bodies (one per row) and of the three tails (one per dimension).

    The full judge prompt is rendered with the template, then split where the tail starts, so
    ``body + tail`` is exactly the templated judge prompt and the tail (dimension question plus the
    template's closing text) is the same for every row.
    """
    tails_text: list[str] = []
    bodies: list[list[int]] = []
    for d in JUDGE_DIMENSIONS:
        full = render_prompt({"instruction": "\x00" + judge_tail(d, target)}, tokenizer, template)
        tails_text.append(full[full.index("\x00") + 1:])
    tails = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in tails_text]
    room = max(8, cutoff_len - max(len(t) for t in tails))
    for row in rows:
        full = render_prompt({"instruction": judge_body(row, target) + judge_tail(JUDGE_DIMENSIONS[0], target)},
                             tokenizer, template)
        head = full[: len(full) - len(tails_text[0])]
        ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        bodies.append(ids[-room:])   # keep the end: the sample sits right before the question
    return bodies, tails


def judge_scores(model, tokenizer, rows: list[dict], template: str, cutoff_len: int,
                 batch_tokens: int) -> np.ndarray:
    """(N, 6) expected 0-10 scores: prompt x (fact, clar, comp), then response x (fact, clar, comp).

    Per batch of samples the body runs once with a KV cache; the cache is repeated three times and
    the three dimension tails run against it in one pass. Tails that spell 10 as "1","0" get a
    trailing "1" so the same pass also gives P("0" | "1").
    """
    import torch

    st = score_tokens(tokenizer)
    out = np.full((len(rows), 6), np.nan)
    device = next(model.parameters()).device
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    pad = tokenizer.pad_token_id
    n_dim = len(JUDGE_DIMENSIONS)
    for t_idx, target in enumerate(("prompt", "response")):
        bodies, tails = judge_sequences(rows, tokenizer, template, cutoff_len, target)
        if st.two_step_ten:
            tails = [t + [st.digits[1]] for t in tails]
        t_len = torch.tensor([len(t) for t in tails], device=device)
        t_max = int(t_len.max())
        tail_ids = torch.full((n_dim, t_max), pad, dtype=torch.long, device=device)
        tail_att = torch.zeros((n_dim, t_max), dtype=torch.long, device=device)
        for j, t in enumerate(tails):
            tail_ids[j, : len(t)] = torch.tensor(t)
            tail_att[j, : len(t)] = 1
        lengths = [len(b) for b in bodies]
        # Budget: the body pass plus three tails per row.
        costs = [n_dim * (length + t_max) for length in lengths]
        with torch.inference_mode():
            for batch in length_batches(costs, batch_tokens * n_dim):
                width = max(lengths[i] for i in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                att = torch.zeros((len(batch), width), dtype=torch.long)
                for r, i in enumerate(batch):
                    ids[r, : lengths[i]] = torch.tensor(bodies[i])
                    att[r, : lengths[i]] = 1
                ids, att = ids.to(device), att.to(device)
                cache = decoder(input_ids=ids, attention_mask=att, use_cache=True).past_key_values
                cache.batch_repeat_interleave(n_dim)                    # row r*3 + j: sample r, dimension j
                b = len(batch)
                q_ids = tail_ids.repeat(b, 1)
                q_att = torch.cat([att.repeat_interleave(n_dim, 0), tail_att.repeat(b, 1)], dim=1)
                body_len = att.sum(1).repeat_interleave(n_dim)
                pos = body_len[:, None] + torch.arange(t_max, device=device)[None, :]
                hidden = decoder(input_ids=q_ids, attention_mask=q_att, position_ids=pos,
                                 past_key_values=cache, use_cache=False).last_hidden_state
                rows_t = torch.arange(b * n_dim, device=device)
                last = t_len.repeat(b) - 1
                first_pos = last - 1 if st.two_step_ten else last
                probs = torch.softmax(head(hidden[rows_t, first_pos]).float(), dim=-1)
                first = probs[:, torch.tensor(st.digits, device=device)].cpu().numpy()
                ten = probs[:, st.ten].cpu().numpy() if st.ten is not None else None
                zero_after_one = None
                if st.two_step_ten:
                    after = torch.softmax(head(hidden[rows_t, last]).float(), dim=-1)
                    zero_after_one = after[:, st.digits[0]].cpu().numpy()
                scores = expected_score(first, zero_after_one, ten).reshape(b, n_dim)
                out[np.asarray(batch), t_idx * n_dim:(t_idx + 1) * n_dim] = scores
    return out


def judge_scores_full_prompts(model, tokenizer, rows: list[dict], template: str, cutoff_len: int,
                              batch_tokens: int) -> np.ndarray:
    """The reference for :func:`judge_scores`: the same (N, 6) scores with one forward per judge prompt.

    ``judge_sequences`` gives each row's body and the three tails; here body + tail runs as one right-padded
    sequence, so any difference from ``judge_scores`` comes from its shared-body cache, not from
    tokenization. For the benchmarks and the GPU check (it pushes every body through the model three times).
    """
    import torch

    st = score_tokens(tokenizer)
    seqs, where = [], []
    for t_idx, target in enumerate(("prompt", "response")):
        bodies, tails = judge_sequences(rows, tokenizer, template, cutoff_len, target)
        if st.two_step_ten:      # the extra "1" gives P("0" | "1") at the last position
            tails = [t + [st.digits[1]] for t in tails]
        for i, body in enumerate(bodies):
            for j, tail in enumerate(tails):
                seqs.append(body + tail)
                where.append((i, t_idx * len(tails) + j))
    lengths = [len(x) for x in seqs]
    first = np.zeros((len(seqs), 10))
    ten = np.zeros(len(seqs)) if st.ten is not None else None
    zero_after_one = np.zeros(len(seqs)) if st.two_step_ten else None
    device = next(model.parameters()).device
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    digits = torch.tensor(st.digits, device=device)
    with torch.inference_mode():
        for batch in length_batches(lengths, batch_tokens):
            width = max(lengths[i] for i in batch)
            ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            att = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):
                ids[r, :lengths[i]] = torch.tensor(seqs[i])
                att[r, :lengths[i]] = 1
            hidden = decoder(input_ids=ids.to(device), attention_mask=att.to(device)).last_hidden_state
            rows_t = torch.arange(len(batch), device=device)
            last = torch.tensor([lengths[i] - 1 for i in batch], device=device)
            probs = torch.softmax(head(hidden[rows_t, last - 1 if st.two_step_ten else last]).float(), dim=-1)
            first[batch] = probs[:, digits].cpu().numpy()
            if ten is not None:
                ten[batch] = probs[:, st.ten].cpu().numpy()
            if zero_after_one is not None:
                after = torch.softmax(head(hidden[rows_t, last]).float(), dim=-1)
                zero_after_one[batch] = after[:, st.digits[0]].cpu().numpy()
    out = np.full((len(rows), 6), np.nan)
    idx = np.asarray(where)
    out[idx[:, 0], idx[:, 1]] = expected_score(first, zero_after_one, ten)
    return out


def judge_generate(model, tokenizer, rows: list[dict], template: str, cutoff_len: int, batch_tokens: int,
                   temperature: float = 0.1, max_new_tokens: int = 8, seed: int = 0) -> np.ndarray:
    """(N, 6) scores the paper's way: the judge writes an answer, and a 0-10 number is parsed from it.

    The six judge prompts per sample are the same texts the probability-weighted mode scores (body +
    dimension tail, end kept under the cutoff). They are generated in length-sorted, left-padded
    batches. ``prompts.parse_score`` only accepts a number at the start of the answer; anything else
    is missing (NaN), never 0.
    """
    import torch

    from middo_ray.prompts import parse_score

    out = np.full((len(rows), 6), np.nan)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seqs: list[list[int]] = []
    where: list[tuple[int, int]] = []
    for t_idx, target in enumerate(("prompt", "response")):
        bodies, tails = judge_sequences(rows, tokenizer, template, cutoff_len, target)
        for i, body in enumerate(bodies):
            for j, tail in enumerate(tails):
                seqs.append(body + tail)
                where.append((i, t_idx * len(JUDGE_DIMENSIONS) + j))
    lengths = [len(x) + max_new_tokens for x in seqs]
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for b_no, batch in enumerate(length_batches(lengths, batch_tokens)):
            width = max(len(seqs[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            att = torch.zeros((len(batch), width), dtype=torch.long)
            for r, i in enumerate(batch):      # left padding: every prompt ends where generation starts
                ids[r, width - len(seqs[i]):] = torch.as_tensor(seqs[i])
                att[r, width - len(seqs[i]):] = 1
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)) + b_no)
            sample = temperature > 0
            res = model.generate(input_ids=ids.to(device), attention_mask=att.to(device), do_sample=sample,
                                 temperature=temperature if sample else None, top_p=1.0 if sample else None,
                                 top_k=0 if sample else None, max_new_tokens=max_new_tokens, pad_token_id=pad)
            texts = tokenizer.batch_decode(res[:, width:], skip_special_tokens=True)
            for r, i in enumerate(batch):
                value = parse_score(texts[r])
                if value is not None:
                    out[where[i]] = value
    return out
