"""Rewards that read the condition's text: every reward call carries the chains' prompts to the rewards that
declare them, CLIPScore and PickScore give transformers' own numbers with gradients to the pixels, and a plain
function (trl's ``reward_fn``) is a reward by its import path; bad inputs are one line naming the setting."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import error_line, run_args, tiny_sd_args
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from ctrl.algorithms import PPO
from ctrl.commands import main
from ctrl.errors import SettingError
from ctrl.module import ControlModule
from ctrl.policy import StableDiffusionPolicy
from ctrl.rewards import ClassifierLogProb, CLIPScore, FunctionReward, JointLabels, PickScore, Reward, call_reward
from ctrl.sampling import sample
from ctrl.testing import make_tiny_clip

PROMPTS = ["a cat", "a dog", "a red fox"]


class Recorder(Reward):
    """Records what it is given; the mean pixel as the reward."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[list[int], list[str] | None]] = []

    def forward(self, x0, labels, prompts):
        self.calls.append((labels.tolist(), prompts))
        return x0.flatten(1).mean(1)


# -- the prompts reach the reward ------------------------------------------------------------------------------
def test_a_reward_sees_the_prompts_of_its_chains(tiny_sd):
    """Conditions are (prompt, class) pairs, c = prompt * 2 + class: the reward gets each chain's class and the
    prompt that chain was sampled with, in the chains' order, from the policy's score (every algorithm and
    inference-time method) and from the module's evaluation."""
    policy = StableDiffusionPolicy(tiny_sd, prompts=PROMPTS, num_classes=2, guidance_scale=1.0, lora_rank=2)
    labels = torch.tensor([5, 0, 3, 2, 4, 1])
    prompts = [PROMPTS[c // 2] for c in labels.tolist()]
    recorder = Recorder()
    traj = sample(policy, labels, 2, 1.0)
    scores = policy.score(recorder, traj.samples, labels)
    assert recorder.calls == [([c % 2 for c in labels.tolist()], prompts)]
    torch.testing.assert_close(scores, policy.decode(traj.samples).flatten(1).mean(1))

    module = ControlModule(policy, recorder, PPO(alpha=0.0), num_steps=2, eval_pretrained=False)
    module._eval_step((labels, torch.arange(6)), "val")
    assert recorder.calls[-1] == ([c % 2 for c in labels.tolist()], prompts)


def test_rewards_without_prompts_keep_their_two_argument_call():
    """A reward (or plain callable) that declares no ``prompts`` is called as before; one that does gets them,
    also inside JointLabels."""
    seen = []

    def plain(x0, labels):
        return x0.flatten(1).sum(1) + labels

    class Both(Reward):
        num_labels = 2

        def forward(self, x0, labels, prompts=None):
            seen.append(prompts)
            return labels.float()

    class LabelsOnly(Reward):
        num_labels = 3

        def forward(self, x0, labels):
            return -labels.float()

    x, labels = torch.ones(2, 1, 2, 2), torch.tensor([5, 1])  # conditions of (2 x 3) label pairs
    torch.testing.assert_close(call_reward(plain, x, labels, ["a", "b"]), torch.tensor([9.0, 5.0]))
    joint = JointLabels([Both(), LabelsOnly()])
    torch.testing.assert_close(call_reward(joint, x, labels, ["a", "b"]), torch.tensor([1.0 - 2.0, 0.0 - 1.0]))
    assert seen == [["a", "b"]]


# -- CLIPScore and PickScore -----------------------------------------------------------------------------------
def _pixels(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Random uint8 RGB images ``[n, h, w, 3]``: the same pixels reach the reward and the PIL path."""
    return torch.randint(0, 256, (n, h, w, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _transformers_score(directory: str, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """exp(logit_scale) cos(image, text) computed the plain transformers way: the processor on PIL images."""
    model, processor = CLIPModel.from_pretrained(directory), CLIPProcessor.from_pretrained(directory)
    inputs = processor(
        text=prompts, images=[Image.fromarray(p.numpy()) for p in pixels], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs.pixel_values)
        text = model.get_text_features(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask)
    image, text = getattr(image, "pooler_output", image), getattr(text, "pooler_output", text)  # transformers 5 / 4
    return model.logit_scale.exp() * torch.nn.functional.cosine_similarity(image, text)


@pytest.mark.parametrize(
    "size, atol",
    [((16, 16), 1e-4), ((24, 40), 0.05)],  # as the processor's input size; resized and cropped (PIL vs torch)
    ids=["processor size", "resized"],
)
@pytest.mark.parametrize("cls", [CLIPScore, PickScore])
def test_clip_rewards_match_transformers_and_pass_gradients(cls, size, atol, tmp_path):
    # another logit scale than CLIP's initial one: the score's scale is the checkpoint's
    directory = make_tiny_clip(tmp_path, seed=1, logit_scale=math.log(30.0))
    reward = cls(directory, processor=directory)
    prompts = ["a cat", "a dog", "a cat", "a red fox"]
    pixels = _pixels(4, *size, seed=0)
    images = (pixels.permute(0, 3, 1, 2).float() / 127.5 - 1).requires_grad_()
    scores = reward(images, torch.zeros(4, dtype=torch.long), prompts)
    expected = _transformers_score(directory, pixels, prompts)
    assert scores.shape == (4,) and float(reward.scale) == pytest.approx(30.0)
    torch.testing.assert_close(scores.detach(), expected, atol=atol, rtol=0)
    # the spread between images is far larger than the tolerance: the comparison can tell them apart
    assert float(expected.max() - expected.min()) > 10 * atol

    scores.sum().backward()
    grad = images.grad
    assert torch.isfinite(grad).all() and (grad.flatten(1).abs().sum(1) > 0).all()
    with torch.no_grad():  # a small step along the gradient raises every image's score
        stepped = reward(images + 1e-3 * grad / grad.flatten(1).norm(dim=1)[:, None, None, None], None, prompts)
    assert (stepped > scores.detach()).all()


def test_clip_score_scores_each_image_against_its_own_prompt(tiny_clip):
    reward = CLIPScore(tiny_clip)
    images = _pixels(2, 16, 16, seed=3).permute(0, 3, 1, 2).float() / 127.5 - 1
    together = reward(images, None, ["a cat", "a dog"])
    apart = torch.cat([reward(images[:1], None, ["a cat"]), reward(images[1:], None, ["a dog"])])
    swapped = reward(images, None, ["a dog", "a cat"])
    torch.testing.assert_close(together, apart)
    assert not torch.allclose(together, swapped)
    # bfloat16 weights: the same scores within bfloat16's precision, the scale itself exact
    half = CLIPScore(tiny_clip, dtype="bfloat16")
    assert half.clip.visual_projection.weight.dtype == torch.bfloat16 and torch.equal(half.scale, reward.scale)
    torch.testing.assert_close(
        half(images, None, ["a cat", "a dog"]), together, atol=0.02 * float(reward.scale), rtol=0
    )


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d, a: CLIPScore(str(d / "nowhere")), r"^CLIPScore\.model: no CLIP model directory at '.*nowhere'"),
        (lambda d, a: CLIPScore(a[0]), r"^CLIPScore\.model: '.*' holds a clip_vision_model model, not a CLIP model"),
        (lambda d, a: PickScore(str(d / "nowhere")), r"^PickScore\.model: no CLIP model directory at '.*nowhere'"),
        (lambda d, a: CLIPScore(str(d)), r"^CLIPScore\.model: could not load a CLIP model from '.*'"),
    ],
    ids=["missing directory", "image tower only", "PickScore missing directory", "empty directory"],
)
def test_clip_rewards_refuse_weights_that_are_not_a_clip_model(make, message, tmp_path, tiny_aesthetic):
    with pytest.raises(SettingError, match=message) as info:
        make(tmp_path, tiny_aesthetic)
    assert "\n" not in str(info.value)


def test_clip_rewards_refuse_a_missing_processor_and_conditions_without_text(tiny_clip, tmp_path):
    with pytest.raises(SettingError, match=r"^PickScore\.processor: could not load a CLIPProcessor .* from '.*'"):
        PickScore(tiny_clip, processor=str(tmp_path))
    with pytest.raises(SettingError, match=r"^CLIPScore: scores each image against its prompt, but the policy's"):
        CLIPScore(tiny_clip)(torch.zeros(2, 3, 16, 16), torch.zeros(2, dtype=torch.long), None)


def test_a_missing_clip_directory_is_refused_by_its_setting_path_through_ctrl(
    tmp_path, tiny_pretrained, monkeypatch, capsys
):
    """Through ``ctrl`` (on the digits config: the weights are refused before the policy is used)."""
    argv = ["fit", *run_args(tmp_path, tiny_pretrained, "unused"), "--model.reward", "ctrl.rewards.CLIPScore"]
    line = error_line([*argv, "--model.reward.model", str(tmp_path / "nowhere")], monkeypatch, capsys)
    assert line.startswith("ctrl: error: model.reward.model: no CLIP model directory at '"), line


def test_clip_score_from_a_config_trains_stable_diffusion_by_reward_backprop(tmp_path, tiny_sd, tiny_clip):
    """``model.reward: CLIPScore`` in the AlignProp config (DirectBackprop through the decoder and CLIP)."""
    reward = ["--model.reward", "ctrl.rewards.CLIPScore", "--model.reward.model", tiny_clip]
    module = main(["fit", *tiny_sd_args("alignprop", tmp_path, tiny_sd, reward)]).model
    assert type(module.reward).__name__ == "CLIPScore" and type(module.algorithm).__name__ == "DirectBackprop"
    lora_b = [p for n, p in module.policy.unet.named_parameters() if "lora_B" in n]
    assert max(float(p.detach().abs().max()) for p in lora_b) > 0  # the reward's gradient reached the adapter
    assert math.isfinite(module.last_metrics["reward"])


# -- a plain function ------------------------------------------------------------------------------------------
CALLS: list[tuple[list[str] | None, list[int], float, float]] = []


def brightness(images, prompts, labels):
    """A trl-style reward function: the mean pixel, recording what it is given."""
    CALLS.append((prompts, labels.tolist(), float(images.min()), float(images.max())))
    return images.mean((1, 2, 3))


def numpy_brightness(images, prompts, labels):
    return images.detach().mean((1, 2, 3)).numpy()


def two_arguments(images, prompts):
    return images.mean((1, 2, 3))


def column(images, prompts, labels):
    return images.mean((1, 2, 3))[:, None]


def trl_pair(images, prompts, labels):
    return images.mean((1, 2, 3)), {}


NOT_A_FUNCTION = 3


def test_function_reward_calls_the_function_with_images_prompts_and_labels():
    CALLS.clear()
    reward = FunctionReward("test_prompt_rewards.brightness", differentiable=True, pixel_range=(0.0, 1.0))
    assert reward.differentiable
    images = torch.tensor([-1.0, 1.0, 0.0, 0.5]).view(4, 1, 1, 1).expand(4, 3, 2, 2).clone().requires_grad_()
    scores = call_reward(reward, images, torch.tensor([0, 1, 2, 3]), ["a", "b", "c", "d"])
    torch.testing.assert_close(scores.detach(), torch.tensor([0.0, 1.0, 0.5, 0.75]))  # [-1, 1] mapped onto [0, 1]
    assert CALLS == [(["a", "b", "c", "d"], [0, 1, 2, 3], 0.0, 1.0)]
    scores.sum().backward()
    assert torch.allclose(images.grad, torch.full_like(images, 0.5 / 12))
    # the colon form, and outputs that are not tensors
    numpy = FunctionReward("test_prompt_rewards:numpy_brightness")
    assert not numpy.differentiable
    torch.testing.assert_close(numpy(images, None, None), images.detach().mean((1, 2, 3)))


@pytest.mark.parametrize(
    "function, message",
    [
        ("no_such_package.rewards.fn", r"'no_such_package.rewards.fn' does not import \(ModuleNotFoundError"),
        ("test_prompt_rewards.missing", r"'test_prompt_rewards.missing' does not import \(AttributeError"),
        (
            "test_prompt_rewards.NOT_A_FUNCTION",
            r"'test_prompt_rewards.NOT_A_FUNCTION' is not callable \(int\); name a function",
        ),
        (
            "test_prompt_rewards.two_arguments",
            r"'.*two_arguments' takes \(images, prompts\), but a reward function takes three",
        ),
    ],
    ids=["no module", "no name", "not callable", "two arguments"],
)
def test_function_reward_refuses_what_cannot_be_called(function, message):
    with pytest.raises(SettingError, match=rf"^FunctionReward\.function: {message}") as info:
        FunctionReward(function)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "function, message",
    [
        ("column", r"returned shape \[2, 1\] for 2 images; it must return one reward per image, shape \[2\]"),
        ("trl_pair", r"returned a tuple for 2 images; .* return the rewards alone"),
    ],
)
def test_function_reward_refuses_an_output_that_is_not_one_reward_per_image(function, message):
    reward = FunctionReward(f"test_prompt_rewards.{function}")
    with pytest.raises(SettingError, match=rf"^FunctionReward\.function: '.*{function}' {message}"):
        reward(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), None)


def test_function_reward_pixel_range_must_be_increasing():
    with pytest.raises(SettingError, match=r"^FunctionReward\.pixel_range: must be \[low, high\] with low < high"):
        FunctionReward("test_prompt_rewards.brightness", pixel_range=(1.0, 0.0))


def test_a_function_reward_from_a_config_trains_stable_diffusion_on_its_prompts(tmp_path, tiny_sd):
    """``model.reward: FunctionReward`` through ``ctrl fit`` on the tiny pipeline: every call gets the prompt of
    each chain (conditions are the prompts themselves here: label c is prompt c), images in ``pixel_range``."""
    CALLS.clear()
    function = ["--model.reward", "ctrl.rewards.FunctionReward"]
    function += ["--model.reward.function", "test_prompt_rewards.brightness", "--model.reward.pixel_range", "[0, 1]"]
    main(["fit", *tiny_sd_args("aesthetic_ddpo", tmp_path, tiny_sd, function)])
    assert len(CALLS) >= 3  # two rollouts and the evaluation
    for prompts, labels, low, high in CALLS:
        assert prompts == [["a cat", "a dog"][c] for c in labels]
        assert 0.0 <= low <= high <= 1.0
    assert {p for prompts, *_ in CALLS for p in prompts} == {"a cat", "a dog"}


def test_a_function_output_refused_at_run_time_names_its_setting_path(tmp_path, tiny_sd, monkeypatch, capsys):
    function = [
        "--model.reward",
        "ctrl.rewards.FunctionReward",
        "--model.reward.function",
        "test_prompt_rewards.column",
    ]
    line = error_line(["fit", *tiny_sd_args("aesthetic_ddpo", tmp_path, tiny_sd, function)], monkeypatch, capsys)
    assert line.startswith("ctrl: error: model.reward.function: 'test_prompt_rewards.column' returned shape [4, 1]")


def test_the_classifier_reward_is_unchanged_by_prompts(tiny_rgb_classifier):
    """A label reward given prompts through call_reward ignores them: the same number as its own call."""
    reward = ClassifierLogProb(tiny_rgb_classifier)
    x, y = torch.rand(3, 3, 16, 16) * 2 - 1, torch.tensor([0, 3, 1])
    torch.testing.assert_close(call_reward(reward, x, y, ["a", "b", "c"]), reward(x, y))
