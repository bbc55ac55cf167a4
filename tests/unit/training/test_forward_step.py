"""The loss function returns token sums and counts, so the global mean is per token (not a mean of means)."""


import pytest
import torch

from megatron_mmpl.training.forward_step import loss_func

pytestmark = pytest.mark.unit


def test_loss_is_token_sum_and_count_so_the_global_mean_is_per_token():
    # two micro-batches with 1 and 3 answer tokens: megatron divides Σ losses by Σ tokens (per-token mean over
    # the global batch), not the mean of the two micro-batch means
    mb1 = loss_func(torch.tensor([[1.0, 0.0]]), torch.tensor([[4.0, 9.0]]))
    mb2 = loss_func(torch.tensor([[1.0, 1.0, 1.0]]), torch.tensor([[1.0, 1.0, 1.0]]))
    assert (mb1[0].item(), mb1[1].item(), mb2[0].item(), mb2[1].item()) == (4.0, 1, 3.0, 3)
    total = mb1[2]["lm loss"] + mb2[2]["lm loss"]
    assert (total[0] / total[1]).item() == pytest.approx(7 / 4)  # mean of means would be 2.5
