"""One GEMM for the projections that read the same input, as a graph pass that torch.compile runs before autograd.

q/k/v read one normed input, as do gate/up, and each LoRA projection's A reads what its base reads: up to five
small products where one would do. Kernels this small are bound by their launches: SmolLM2's 3-epoch recipe ran
158,021 real tokens/s with the LoRA A's fused, against 143,889 without, and 163,909 with its frozen q/k/v and
gate/up fused as well (bench/RESULTS.md). The product x·[W1; W2; ...]ᵀ is split back into each projection's
columns; every output element is the same dot product as before, and autograd gives each weight its own rows of
the one weight gradient."""
import collections
import operator

import torch
import torch.nn.functional as F
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

LINEARS = (F.linear, torch._C._nn.linear)
# Frozen weights are concatenated anew at every forward pass, and the copy is kept for the backward pass or made again
# there. Up to this size a group's copy costs less than the launches it saves. The 8B's q/k/v (50 MB a block) and
# gate/up (235 MB) would copy 9 GB a pass (and keep it, where nothing is recomputed); its GEMMs run near peak already.
FROZEN_GROUP_BYTES = 8 * 2**20


def _input_and_weight(node: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(input, weight) of `node` if it is a bias-free linear of a graph input's 2-D weight, else None."""
    if node.op != "call_function" or node.target not in LINEARS:
        return None
    args = dict(zip(("input", "weight", "bias"), node.args)) | node.kwargs
    weight = args.get("weight")
    if args.get("bias") is not None or not isinstance(weight, torch.fx.Node) or weight.op not in ("placeholder",
                                                                                                  "get_attr"):
        return None
    value = weight.meta.get("example_value")
    return (args["input"], weight) if isinstance(value, torch.Tensor) and value.dim() == 2 else None


# What a joined product's piece may feed: ops that read it and return a new tensor. A piece is a view of the joint
# product's columns; a view of it, a write into it, or handing it out of the graph could differ from the unjoined
# product (other strides, the write reaching the other pieces' storage).
READERS = frozenset({*LINEARS, F.silu, operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul})


def _ends_region(node: torch.fx.Node) -> bool:
    """Whether `node` enters or leaves an autocast, no-grad or inference-mode region, or may write into a tensor:
    products on either side of it must not be joined (the write may change their input or weight)."""
    if node.op not in ("call_function", "call_method"):
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return (node.target is torch._C._set_grad_enabled or any(word in name for word in ("autocast", "inference_mode"))
            or name.endswith("_") or node.target is operator.setitem
            or (getattr(node.target, "__module__", "") == "_operator" and name.startswith("i"))
            or node.kwargs.get("inplace") is True or "out" in node.kwargs)


class FuseSharedInputLinears(CustomGraphPass):
    """Groups bias-free linears whose outputs only feed READERS by their input, their weights' dtype and trainability,
    and the region they run in (between mode changes and writes); replaces each group of two or more with one linear
    of the concatenated weights and a split. Frozen weights only where the group's take at most FROZEN_GROUP_BYTES."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        groups: dict[tuple, list[tuple[torch.fx.Node, torch.fx.Node]]] = collections.defaultdict(list)
        region = 0
        for node in graph.nodes:
            region += _ends_region(node)
            found = _input_and_weight(node)
            if found is not None and all(user.op == "call_function" and user.target in READERS for user in node.users):
                x, weight = found
                value = weight.meta["example_value"]
                groups[(x, value.dtype, value.requires_grad, region)].append((node, weight))
        for (x, _, trainable, _), members in groups.items():
            values = [weight.meta["example_value"] for _, weight in members]
            if len(members) < 2 or (not trainable and sum(v.numel() * v.element_size() for v in values)
                                    > FROZEN_GROUP_BYTES):
                continue
            first = members[0][0]
            with graph.inserting_before(first):
                weights = graph.call_function(torch.cat, ([weight for _, weight in members],), {"dim": 0})
                product = graph.call_function(torch._C._nn.linear, (x, weights))
                pieces = graph.call_function(torch.split, (product, [v.shape[0] for v in values]), {"dim": -1})
                outputs = [graph.call_function(operator.getitem, (pieces, i)) for i in range(len(members))]
            for (node, _), output in zip(members, outputs):
                node.replace_all_uses_with(output)
                graph.erase_node(node)

    def uuid(self) -> str:
        return f"{get_hash_for_files((__file__,)).hex()}-{FROZEN_GROUP_BYTES}"
