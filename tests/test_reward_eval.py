import pytest
import torch

from drm_ray.data.cache import PairBatch, pair_rows, write_meta, write_shard
from drm_ray.reward.evaluate import evaluate_drm, format_table, tie_aware_accuracy


class ChannelMean(torch.nn.Module):
    """A 'DRM' that prefers a high mean in latent channel 0: correct on clean pairs built that way."""

    device = torch.device("cpu")

    def forward(self, x, s, e, p):
        return x[:, 0].mean(dim=(1, 2))


def test_accuracy_falls_with_noise_and_ties_are_reported(tmp_path):
    g = torch.Generator().manual_seed(0)
    n = 200
    win, lose = torch.randn(n, 16, 8, 8, generator=g) * 0.1, torch.randn(n, 16, 8, 8, generator=g) * 0.1
    win[:, 0] += 0.3
    label = torch.ones(n)
    label[:20] = 0.5
    lose[:20] = win[:20]  # ties: identical images
    write_shard(tmp_path, 0, pair_rows(PairBatch(win, lose, torch.zeros(n, 4, 8), torch.zeros(n, 8), label,
                                                 ["p"] * n)))
    write_meta(tmp_path, [16, 8, 8], [4, 8], [8])
    rows = evaluate_drm(ChannelMean(), tmp_path, timesteps=(0, 500, 950))
    assert [r.t for r in rows] == [0, 500, 950] and rows[0].pairs == 180 and rows[0].ties == 20
    assert rows[0].accuracy == 1.0
    # at t=0 the per-pair margins are the channel-0 means' differences of the non-tie pairs, in file order
    expected = (win[20:, 0].mean(dim=(1, 2)) - lose[20:, 0].mean(dim=(1, 2))).tolist()
    assert rows[0].margins == pytest.approx(expected, abs=1e-6) and len(rows[2].margins) == 180
    assert rows[2].accuracy < rows[0].accuracy  # signal drowns in noise near s = 1
    assert rows[0].tie_aware_accuracy == pytest.approx(1.0)  # identical images -> margin 0 < tau
    assert "tie-aware" in format_table(rows)


def test_tie_aware_accuracy_by_hand():
    # margins 2, -1, 0.1 with labels win, win, tie; candidate taus 0, 0.1, 1, 2 (|margin| < tau predicts a tie):
    # tau = 0 or 0.1 -> win right, -1 wrong, tie missed = 1/3; tau = 1 -> win right, -1 wrong, tie right = 2/3
    # tau = 2 -> 2/3 as well; the first best is tau = 1
    acc, tau = tie_aware_accuracy(torch.tensor([2.0, -1.0, 0.1]), torch.zeros(3), torch.tensor([1.0, 1.0, 0.5]))
    assert acc == pytest.approx(2 / 3) and tau == pytest.approx(1.0)
