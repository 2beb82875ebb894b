"""The one draw every strategy makes: sample_from follows the probabilities it is given."""

from __future__ import annotations

import torch

from exitspec.decoding.sampling import RowSampling, SamplingParams, sample_from


def test_draws_follow_the_distribution_and_never_pick_a_zero_probability_token():
    p = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.15, 0.05, 0.0])
    g = torch.Generator().manual_seed(0)
    draws = sample_from(p.expand(20000, -1), g)  # (20000,)
    freq = torch.bincount(draws, minlength=p.numel()).double() / draws.numel()
    assert freq[p == 0].sum() == 0
    assert (freq - p.double()).abs().sum() / 2 < 0.01  # total variation


def test_unnormalised_weights_and_seeded_rows_in_a_batch_draw_what_they_draw_alone():
    w = torch.rand(3, 50) * (torch.rand(3, 50) > 0.5)  # unnormalised, with zeros
    params = SamplingParams(temperature=1.0, seed=7)
    rows = RowSampling([params] * 3, [params.generator() for _ in range(3)])
    together = sample_from(w, rows)
    alone = [sample_from(w[b:b + 1], params.generator())[0] for b in range(3)]
    assert together.tolist() == [int(a) for a in alone]
    assert all(w[b, int(t)] > 0 for b, t in enumerate(together))
