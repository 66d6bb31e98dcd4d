"""Load the reference implementation's weights (ChiChienMile/IGReg) into the bundle's modules.

The reference's main network (`Backbone`, a.k.a. `BranchMain`) and its auxiliary classifier
(`AuxClassifer`, the STDGP surrogate) name their layers differently from `IGRegNet` and
`scripts.stdgp.Surrogate`. A reference key is renamed by its longest matching prefix:

    reference prefix                          bundle prefix
    backbone.layer0.{0,1,2}                   encoder.stem.{0,1,2}            stem conv, BN, PReLU
    backbone.layer1.1.{b}  (layer1.0 = pool)  encoder.stages.0.{b}
    backbone.layer{s}.{b}  (s = 2, 3, 4)      encoder.stages.{s-1}.{b}
      .conv1 .bn1 .conv2 .bn2 .conv3 .bn3       .body.0 .body.1 .body.3 .body.4 .body.6 .body.7
      .relu  (one PReLU used three times)       .body.2, .body.5 and .act (one shared module)
      .se.fc  .downsample                       .body.8.fc  .shortcut
    bivablock1.conv_l{i}_down_channel         neck.biva.reduce.{i-1}
    bivablock1.VAblock{l}.l{l}_va_branch{j}   neck.biva.attend.{l-1}.branches.{j}
    bivablock1.VAblock{l}.fusion{l}.0         neck.biva.attend.{l-1}.fuse
    bivablock1.VAblock{l}.PReLU               neck.biva.attend.{l-1}.act
    bivablock1.pool{1,2}.{conv,group_norm,leaky}   neck.biva.down.{0,1}.{0,1,2}
    bivablock1.F{3,2,1}_w1 (+ _relu)          neck.biva.mix_down.{0,1,2}.weight (+ .act)
    bivablock1.F{1,2,3,4}_w2 (+ _relu)        neck.biva.mix_up.{0,1,2,3}.weight (+ .act)
    fusion0.{3k+n}                            neck.fusion.{k}.{n}
    ASA{i}.attention.{0..5} / .6              neck.asa.{i}.attention.{0,1}.{0,1,2} / .2
    ASA{i}.refine.{3k+n}                      neck.asa.{i}.refine.{k}.{n}
    ASA{i}.pool                               neck.asa.{i}.down
    ASA{i}.weight_level_0 / _1 / weight_levels   neck.asa.{i}.embed_level / embed_fused / scale_logits
    pool0 / pool1                             classifier.down8 / classifier.down16
    attention2.{0,1,2} / attention2.3         classifier.gate8.gate.0.{0,1,2} / classifier.gate8.gate.1
    conv2                                     classifier.gate8.conv        (attention3, conv3: gate16)
    CLSmodel.{t}                              classifier.heads.{t}
    attention0, conv0 / attention1, conv1     decoder.gate8 / decoder.gate4  (as the classifier gates)
    conv1_up / fusion1                        decoder.up2 / decoder.fusion
    predict / predict_fuse0 / predict_fuse1   decoder.head / decoder.head_fuse0 / decoder.head_fuse1

`add_conv3D` blocks (`pool*`, `weight_level_*`) name their layers conv, group_norm, leaky (-> 0, 1, 2).
Every reference `VAblock` also holds the fusion convolutions of the other levels, which its forward
never uses; they are dropped (`UNUSED`). Anything else unmatched, missing or of another shape is an
error. `AuxClassifer` has the neck and classifier rows only.
"""

from __future__ import annotations

import re
from typing import Dict, List, Mapping, Tuple

import torch
from torch import Tensor, nn

# stage index in the reference -> (reference prefix, bundle prefix)
_ENCODER_STAGES = [("backbone.layer1.1", "encoder.stages.0")] + [
    (f"backbone.layer{s}", f"encoder.stages.{s - 1}") for s in (2, 3, 4)]
_BOTTLENECK = {"conv1": ("body.0",), "bn1": ("body.1",), "relu": ("body.2", "body.5", "act"), "conv2": ("body.3",),
               "bn2": ("body.4",), "conv3": ("body.6",), "bn3": ("body.7",), "se.fc": ("body.8.fc",),
               "downsample": ("shortcut",)}
_ADD_CONV = {"conv": "0", "group_norm": "1", "leaky": "2"}
_VA_BRANCHES = {1: 4, 2: 3, 3: 2, 4: 2}
UNUSED = re.compile(r"^bivablock1\.VAblock(\d)\.fusion(\d)\.")


def _add_conv(ref: str, bundle: str) -> List[Tuple[str, Tuple[str, ...]]]:
    return [(f"{ref}.{a}", (f"{bundle}.{b}",)) for a, b in _ADD_CONV.items()]


def _triples(ref: str, bundle: str, n_layers: int) -> List[Tuple[str, Tuple[str, ...]]]:
    """A flat Sequential of (conv, norm, act) triples -> nested ConvNormAct blocks."""
    return [(f"{ref}.{i}", (f"{bundle}.{i // 3}.{i % 3}",)) for i in range(n_layers)]


def _gate(ref_attention: str, ref_conv: str, bundle: str) -> List[Tuple[str, Tuple[str, ...]]]:
    rows = _triples(ref_attention, f"{bundle}.gate", 3) + [(f"{ref_attention}.3", (f"{bundle}.gate.1",))]
    return rows + [(f"{ref_conv}.{i}", (f"{bundle}.conv.{i}",)) for i in range(3)]


def neck_classifier_map(num_tasks: int = 3) -> List[Tuple[str, Tuple[str, ...]]]:
    """Rows (reference prefix, bundle prefixes) shared by `Backbone` and `AuxClassifer`."""
    rows: List[Tuple[str, Tuple[str, ...]]] = []
    b = "bivablock1"
    for i in range(1, 5):
        rows.append((f"{b}.conv_l{i}_down_channel", (f"neck.biva.reduce.{i - 1}",)))
        for j in range(_VA_BRANCHES[i]):
            rows.append((f"{b}.VAblock{i}.l{i}_va_branch{j}", (f"neck.biva.attend.{i - 1}.branches.{j}",)))
        rows.append((f"{b}.VAblock{i}.fusion{i}.0", (f"neck.biva.attend.{i - 1}.fuse",)))
        rows.append((f"{b}.VAblock{i}.PReLU", (f"neck.biva.attend.{i - 1}.act",)))
    rows += _add_conv(f"{b}.pool1", "neck.biva.down.0") + _add_conv(f"{b}.pool2", "neck.biva.down.1")
    for k, level in enumerate((3, 2, 1)):
        rows += [(f"{b}.F{level}_w1", (f"neck.biva.mix_down.{k}.weight",)),
                 (f"{b}.F{level}_w1_relu", (f"neck.biva.mix_down.{k}.act",))]
    for k, level in enumerate((1, 2, 3, 4)):
        rows += [(f"{b}.F{level}_w2", (f"neck.biva.mix_up.{k}.weight",)),
                 (f"{b}.F{level}_w2_relu", (f"neck.biva.mix_up.{k}.act",))]
    rows += _triples("fusion0", "neck.fusion", 9)
    for i in range(4):
        a, n = f"ASA{i}", f"neck.asa.{i}"
        rows += _triples(f"{a}.attention", f"{n}.attention", 6) + [(f"{a}.attention.6", (f"{n}.attention.2",))]
        rows += _triples(f"{a}.refine", f"{n}.refine", 9)
        rows += _add_conv(f"{a}.pool", f"{n}.down") + _add_conv(f"{a}.weight_level_0", f"{n}.embed_level")
        rows += _add_conv(f"{a}.weight_level_1", f"{n}.embed_fused") + [(f"{a}.weight_levels", (f"{n}.scale_logits",))]
    rows += _add_conv("pool0", "classifier.down8") + _add_conv("pool1", "classifier.down16")
    rows += _gate("attention2", "conv2", "classifier.gate8") + _gate("attention3", "conv3", "classifier.gate16")
    rows += [(f"CLSmodel.{t}", (f"classifier.heads.{t}",)) for t in range(num_tasks)]
    return rows


def backbone_map(depths: Tuple[int, ...] = (3, 4, 6, 3), num_tasks: int = 3) -> List[Tuple[str, Tuple[str, ...]]]:
    """Rows (reference prefix, bundle prefixes) from the reference `Backbone` onto `IGRegNet`."""
    rows: List[Tuple[str, Tuple[str, ...]]] = [(f"backbone.layer0.{i}", (f"encoder.stem.{i}",)) for i in range(3)]
    for (ref, bundle), depth in zip(_ENCODER_STAGES, depths):
        for blk in range(depth):
            rows += [(f"{ref}.{blk}.{a}", tuple(f"{bundle}.{blk}.{t}" for t in targets))
                     for a, targets in _BOTTLENECK.items()]
    rows += neck_classifier_map(num_tasks)
    rows += _gate("attention0", "conv0", "decoder.gate8") + _gate("attention1", "conv1", "decoder.gate4")
    rows += [(f"conv1_up.{i}", (f"decoder.up2.{i}",)) for i in range(3)] + _triples("fusion1", "decoder.fusion", 9)
    rows += [("predict", ("decoder.head",)), ("predict_fuse0", ("decoder.head_fuse0",)),
             ("predict_fuse1", ("decoder.head_fuse1",))]
    return rows


def _is_unused(key: str) -> bool:
    m = UNUSED.match(key)
    return m is not None and m.group(1) != m.group(2)


Rows = List[Tuple[str, Tuple[str, ...]]]


def rename(reference_state: Mapping[str, Tensor], rows: Rows) -> Tuple[Dict[str, Tensor], List[str]]:
    """(renamed state, reference keys that no row matched); unused reference layers are dropped."""
    table = dict(rows)
    out: Dict[str, Tensor] = {}
    unmatched: List[str] = []
    for key, value in reference_state.items():
        if _is_unused(key):
            continue
        parts = key.split(".")
        for cut in range(len(parts), 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in table:
                rest = ".".join(parts[cut:])
                for target in table[prefix]:
                    out[f"{target}.{rest}" if rest else target] = value
                break
        else:
            unmatched.append(key)
    return out, unmatched


def _load(module: nn.Module, reference_state: Mapping[str, Tensor], rows: List[Tuple[str, Tuple[str, ...]]]) -> None:
    mapped, unexpected = rename(reference_state, rows)
    own = module.state_dict()
    missing = sorted(set(own) - set(mapped))
    unexpected += sorted(k for k in mapped if k not in own)
    shapes = sorted(f"{k}: {tuple(mapped[k].shape)} vs {tuple(own[k].shape)}" for k in own
                    if k in mapped and mapped[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(f"reference weights do not fit {type(module).__name__}: missing {missing}, "
                         f"unexpected {unexpected}, shape mismatches {shapes}")
    with torch.no_grad():
        module.load_state_dict(mapped, strict=True)


def load_reference_weights(network: nn.Module, reference_state_dict: Mapping[str, Tensor]) -> None:
    """Load a reference `Backbone` state dict into an `IGRegNet` (strict; a ValueError names the
    missing, unexpected and mis-shaped keys)."""
    depths = tuple(len(stage) for stage in network.encoder.stages)
    _load(network, reference_state_dict, backbone_map(depths, len(network.classifier.heads)))


def load_reference_surrogate_weights(surrogate: nn.Module, reference_state_dict: Mapping[str, Tensor]) -> None:
    """Load a reference `AuxClassifer` state dict into a `scripts.stdgp.Surrogate` (strict)."""
    _load(surrogate, reference_state_dict, neck_classifier_map(len(surrogate.classifier.heads)))


def backbone_state_from_checkpoint(state: Mapping[str, Tensor],
                                   prefix: str = "IGReg_DPA.BranchMain.") -> Dict[str, Tensor]:
    """The `Backbone` part of a state dict of the reference's whole `IGReg` model (e.g. an authors'
    checkpoint: `torch.load(path, weights_only=False).state_dict()`)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
