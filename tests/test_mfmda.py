"""MFM-DA mechanisms: the instance-aware adaptor, target adaptation, low-pass-guided translation, pyramid
alignment and the stage-2 step, on tiny networks."""

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from medpeft_monai.data import load_datalist, write_datalist
from medpeft_monai.data.transforms import NestedRegionsd, diffusion_transforms, nested_regions_to_label
from medpeft_monai.engines.mfmda import (
    AlignedPairStep,
    TargetAdaptationTrainer,
    load_stage,
    lowpass,
    save_stage,
    translate,
    translate_datalist,
)
from medpeft_monai.losses import gram_matrix, pyramid_alignment_loss
from medpeft_monai.nets import FrozenImageEncoder, InstanceAwareAdaptor, PeftSegmenter
from tests.conftest import TINY_VIT

NAME, KW = TINY_VIT
T = 100  # diffusion steps of the tiny schedules


def tiny_unet(channels=(8, 16)):
    return DiffusionModelUNet(spatial_dims=2, in_channels=3, out_channels=3, channels=channels,
                              attention_levels=(False,) * len(channels), num_res_blocks=1, norm_num_groups=8)


def tiny_encoder():
    return FrozenImageEncoder(NAME, weights=None, image_size=32, model_kwargs=KW)


class GaussianOracle(nn.Module):
    """The exact noise predictor for data ``x0 ~ N(mu, s^2 I)`` (per channel):
    ``E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a)``: a perfectly adapted 'target DDPM' whose
    target images are flat colour ``mu`` with noise ``s``."""

    def __init__(self, scheduler, mu, s: float = 0.1) -> None:
        super().__init__()
        self.a, self.mu, self.s = scheduler.alphas_cumprod, torch.as_tensor(mu).view(1, -1, 1, 1), s

    def forward(self, x, t):
        a = self.a[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s**2 + 1 - a)


def smooth_images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Reddish images with large bright/dark blobs (low-frequency structure) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor([0.6, -0.3, -0.5]).view(1, 3, 1, 1)
    blobs = nn.functional.interpolate(torch.rand(n, 1, 4, 4, generator=g), size=(size, size), mode="bilinear")
    return (base + 0.8 * (blobs - 0.5)).clamp(-1, 1)


# ------------------------------------------------------------------------------------------------ adaptor


def test_static_direction_is_the_mean_difference_and_the_gate_starts_near_zero():
    torch.manual_seed(0)
    src, tgt = torch.randn(20, 32), torch.randn(10, 32) + 2.0
    adaptor = InstanceAwareAdaptor(32)
    with pytest.raises(RuntimeError, match="set_directions"):
        adaptor(src)
    adaptor.set_directions(src, tgt)
    torch.testing.assert_close(adaptor.static_direction, tgt.mean(0) - src.mean(0))
    torch.testing.assert_close(adaptor.target_mean, tgt.mean(0))
    gate = adaptor.gate_value(src).detach()
    assert gate.shape == (20, 1) and float(gate.max()) < 0.05 and float(gate.mean()) < 0.02
    # at the start Delta is (almost) the static direction; the static-only ablation is exactly it
    delta = adaptor(src)
    assert float((delta - adaptor.static_direction).norm(dim=1).max()) < 0.1 * float(adaptor.static_direction.norm())
    static_only = InstanceAwareAdaptor(32, dynamic=False)
    static_only.set_directions(src, tgt)
    torch.testing.assert_close(static_only(src), adaptor.static_direction.expand(20, -1))


def test_target_adaptation_lowers_the_consistency_loss_and_updates_unet_and_adaptor():
    torch.manual_seed(0)
    unet, encoder = tiny_unet(), tiny_encoder()
    adaptor = InstanceAwareAdaptor(encoder.dim)
    scheduler = DDPMScheduler(num_train_timesteps=T, schedule="cosine")
    source = [{"image": x} for x in smooth_images(8)]
    target = smooth_images(4, seed=1).flip(1)  # another colour response
    frozen = {k: v.clone() for k, v in encoder.state_dict().items()}
    before_unet = {k: v.clone() for k, v in unet.state_dict().items()}
    params = list(unet.parameters()) + list(adaptor.parameters())
    trainer = TargetAdaptationTrainer(device=torch.device("cpu"), max_epochs=30,
                                      train_data_loader=DataLoader(source, batch_size=8), network=unet,
                                      optimizer=torch.optim.Adam(params, lr=2e-3), scheduler=scheduler,
                                      encoder=encoder, adaptor=adaptor, target_images=target, target_batch_size=4,
                                      consistency_t=(0.5, 0.6))
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda e: losses.append(float(e.state.output["loss_consistency"]))
                              if e.state.iteration % 2 == 1 else None)
    trainer.run()
    assert len(losses) == 15 and all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4]), losses
    assert bool(adaptor.initialised) and float(adaptor.static_direction.norm()) > 0
    assert any(not torch.equal(v, before_unet[k]) for k, v in unet.state_dict().items())
    assert adaptor.direction[0].weight.grad is not None
    for k, v in encoder.state_dict().items():  # the measuring encoder never trains
        assert torch.equal(v, frozen[k]), k


# ------------------------------------------------------------------------------------------------ translation


def test_translation_keeps_the_source_low_pass_while_moving_colour_to_the_target():
    torch.manual_seed(0)
    ddim = DDIMScheduler(num_train_timesteps=T, schedule="cosine")
    source = smooth_images(2)
    target_mu = torch.tensor([-0.2, 0.3, 0.1])
    oracle = GaussianOracle(ddim, target_mu, s=0.5)
    guided = translate(oracle, ddim, source, strength=0.6, guidance_until=0.2, lowpass_factor=8,
                       num_inference_steps=20, generator=torch.Generator().manual_seed(0))
    free = translate(oracle, ddim, source, strength=0.6, guidance_until=1.0, lowpass_factor=8,
                     num_inference_steps=20, generator=torch.Generator().manual_seed(0))
    assert guided.shape == source.shape and float(guided.abs().max()) <= 1.0

    def colour_gap(x):
        return float((x.mean((2, 3)) - target_mu).abs().mean())

    assert colour_gap(guided) < 0.8 * colour_gap(source)  # statistics move toward the target
    assert colour_gap(free) < colour_gap(guided)  # (more so without guidance: the trade-off it makes)

    def structure(x):  # the low-pass pattern around each channel's mean
        lp = lowpass(x, 8)
        return (lp - lp.mean((2, 3), keepdim=True)).flatten(1)

    def structure_error(x):
        return float((structure(x) - structure(source)).norm() / structure(source).norm())

    # the target prior flattens the blobs unless the guidance keeps the source's low frequencies
    assert structure_error(guided) < 0.5 * structure_error(free), (structure_error(guided), structure_error(free))
    corr = nn.functional.cosine_similarity(structure(guided), structure(source)).min()
    assert float(corr) > 0.9


def test_translate_datalist_pairs_translations_with_sources_in_file_orientation(tmp_path):
    rng = np.random.default_rng(0)
    arr = np.zeros((32, 48, 3), np.uint8)  # non-square: orientation errors would show
    arr[:, :16] = (200, 60, 40)
    arr[:, 16:] = (90, 30, 20)
    arr = np.clip(arr + rng.integers(0, 8, arr.shape), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "src.png")
    Image.fromarray(np.ones((32, 48), np.uint8)).save(tmp_path / "lab.png")
    write_datalist(tmp_path / "dl.json", {"training": [{"image": str(tmp_path / "src.png"),
                                                        "label": str(tmp_path / "lab.png")}]})
    ddim = DDIMScheduler(num_train_timesteps=T, schedule="cosine")
    oracle = GaussianOracle(ddim, torch.zeros(3), s=0.5)
    out = translate_datalist(oracle, ddim, tmp_path / "dl.json", ["training"],
                             diffusion_transforms("eval", image_size=(32, 32)), tmp_path / "tr",
                             strength=0.05, guidance_until=0.0, num_inference_steps=50)
    entry = load_datalist(out, "training")[0]
    assert entry["source"].endswith("src.png") and entry["label"].endswith("lab.png")
    written = np.asarray(Image.open(entry["image"]))
    assert written.shape == arr.shape  # back on the source's grid, same orientation
    # almost no noise added (strength 0.05): the left/right halves keep their colours
    assert written[:, :14, 0].mean() > written[:, 18:, 0].mean() + 40


def test_stage_artefacts_load_strictly_and_name_the_fix(tmp_path):
    unet = tiny_unet()
    path = save_stage(tmp_path / "ddpm.pt", unet=unet)
    other = tiny_unet()
    load_stage(path, "run stage 1a", unet=other)
    for k, v in unet.state_dict().items():
        assert torch.equal(v, other.state_dict()[k])
    with pytest.raises(FileNotFoundError, match="run stage 1a"):
        load_stage(tmp_path / "missing.pt", "run stage 1a", unet=other)
    with pytest.raises(ValueError, match="another unet architecture.*run stage 1a"):
        load_stage(path, "run stage 1a", unet=tiny_unet((8, 24)))
    with pytest.raises(ValueError, match="no 'adaptor' weights"):
        load_stage(path, "run stage 1b", adaptor=InstanceAwareAdaptor(8))


# ------------------------------------------------------------------------------------------------ stage 2


def test_pyramid_alignment_is_zero_for_identical_inputs():
    torch.manual_seed(0)
    feats = [torch.randn(2, 8, 4, 4), torch.randn(2, 16, 2, 2)]
    assert float(pyramid_alignment_loss(feats, [f.clone() for f in feats])) == pytest.approx(0.0, abs=1e-6)
    # scale per position does not matter (cosine), a different direction does
    assert float(pyramid_alignment_loss(feats, [3 * f for f in feats])) == pytest.approx(0.0, abs=1e-6)
    assert float(pyramid_alignment_loss(feats, [-f for f in feats])) == pytest.approx(2.0, abs=1e-5)
    with pytest.raises(ValueError, match="same, non-zero number of levels"):
        pyramid_alignment_loss(feats, feats[:1])
    g = gram_matrix(feats[0])
    assert g.shape == (2, 8, 8) and torch.allclose(g, g.transpose(1, 2))


def test_nested_regions_round_trip():
    label = torch.tensor([[[0, 1, 2], [2, 1, 0]]])
    regions = NestedRegionsd(keys="label", num_regions=2)({"label": label})["label"]
    assert regions.shape == (2, 2, 3)
    assert regions[0].tolist() == [[0, 1, 1], [1, 1, 0]] and regions[1].tolist() == [[0, 0, 1], [1, 0, 0]]
    assert torch.equal(nested_regions_to_label(regions), label)
    cup_outside_disc = torch.tensor([[[0.0]], [[1.0]]])
    assert int(nested_regions_to_label(cup_outside_disc)) == 0


@pytest.mark.parametrize("align_weight", [1.0, 0.0])
def test_stage2_step_trains_only_lora_and_decoder(align_weight):
    torch.manual_seed(0)
    net = PeftSegmenter(NAME, 2, peft={"method": "lora", "rank": 4, "alpha": 4.0}, image_size=32, in_chans=3,
                        model_kwargs=KW, decoder_channels=16)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(4, 3, 32, 32)
    batch = {"image": x, "source": x.flip(1), "label": (torch.rand(4, 2, 32, 32) > 0.5).float()}
    step = AlignedPairStep(align_weight=align_weight)
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=2, train_data_loader=[batch], network=net,
                                optimizer=torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5),
                                loss_function=nn.BCEWithLogitsLoss(), iteration_update=step, decollate=False)
    trainer.run()
    out = trainer.state.output
    assert out["pred"].shape == (4, 2, 32, 32)
    assert (float(out["loss_align"]) > 0) == (align_weight > 0)
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora" in k or k.startswith("decoder.") for k in changed), sorted(changed)
    assert any("lora" in k for k in changed)
