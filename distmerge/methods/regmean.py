"""RegMean (Jin et al., ICLR 2023): each linear layer's weight fits every expert's outputs on that expert's own
inputs, W^T = (sum_t w_t G~_t)^-1 sum_t w_t G~_t W_t^T (``distmerge.ops.regmean``); every other tensor is the
(weighted) average.

G_t is the mean Gram X_t^T X_t / N_t that ``distmerge measure regmean`` wrote for the expert named t
(``parameters.statistics``, see ``distmerge.measure.stats``). The manifests are checked on the driver before any
read (each expert has committed statistics, no layer measured for one expert and not another); each Gram is read
alone, when its tensor is merged, and the weight the merge reads is compared with the one measured.
"""

from __future__ import annotations

from dataclasses import dataclass

from distmerge.errors import ConfigError, InputError
from distmerge.measure import stats
from distmerge.methods.base import MergeMethod, require_number
from distmerge.methods.execute import ChunkResult
from distmerge.ops.regmean import regmean_linear
from distmerge.ops.task_vectors import weight_average

KIND = "regmean"


@dataclass(frozen=True)
class RegMeanParams:
    statistics: str | None = None  # the folder `distmerge measure regmean` wrote
    alpha: float = 0.9  # G~ = alpha G + (1 - alpha) diag(G): 1 keeps the Gram, 0 only its diagonal

    def validate(self, where: str) -> None:
        if not isinstance(self.statistics, str) or not self.statistics:
            raise ConfigError(f"{where}.statistics: regmean needs the folder written by `distmerge measure regmean`")
        require_number(where, "alpha", self.alpha, 0.0, 1.0)


class RegMean(MergeMethod):
    name = "regmean"
    Params = RegMeanParams
    needs_base = False

    def chunkable(self) -> bool:
        return False

    def divides_by_weight_sum(self) -> bool:
        return True

    def initial_state(self, jobs):
        if not jobs:
            return {}
        models = jobs[0].model_names
        manifests = [stats.load_manifest(self.params.statistics, model, KIND) for model in models]
        linear = {}
        for job in jobs:
            if not job.name.endswith(".weight"):
                continue
            module = job.name[: -len(".weight")]
            found = [module in manifest["layers"] for manifest in manifests]
            if not any(found):
                continue  # not a linear layer (embeddings, norms): averaged
            if not all(found):
                lacking = manifests[found.index(False)]
                raise InputError(f"statistics '{lacking['grams_path']}': no Gram for layer '{module}', which the "
                                 f"statistics of '{models[found.index(True)]}' have (measured on another model?)")
            linear[job.name] = {"module": module, "layers": [manifest["layers"][module] for manifest in manifests]}
        if not linear:
            raise InputError(f"statistics '{self.params.statistics}': none of the merged tensors is a measured linear "
                             f"layer (statistics of another architecture?)")
        return {"grams": [manifest["grams_path"] for manifest in manifests], "linear": linear}

    def merge(self, base, experts, job, offset, state):
        entry = state["linear"].get(job.name)
        if entry is None:
            return ChunkResult(weight_average(experts, job.weights, True))
        module, grams, weights = entry["module"], [], []
        for expert, layer, path, model in zip(experts, entry["layers"], state["grams"], job.model_names):
            transposed = layer.get("transposed", False)
            weight = expert.T if transposed else expert  # GPT-2's Conv1D stores [in, out]
            check_layer(weight, layer, path, module, model)
            total = stats.read_gram(path, module, expert.device)
            tokens = int(layer["tokens"])
            grams.append(total / tokens if tokens > 0 else total)  # a layer no token reached adds nothing
            weights.append(weight)
        merged = regmean_linear(weights, grams, self.params.alpha, job.weights)
        return ChunkResult((merged.T if entry["layers"][0].get("transposed", False) else merged).to(experts[0].dtype))

    def check_models(self, checkpoints) -> None:
        """Refuse statistics whose recorded fingerprint is not the expert's ({model name: Checkpoint})."""
        for name, checkpoint in checkpoints.items():
            manifest = stats.load_manifest(self.params.statistics, name, KIND)
            if manifest.get("fingerprint") != stats.model_fingerprint(checkpoint):
                raise InputError(f"statistics '{manifest['manifest_path']}': measured on '{manifest.get('model')}', "
                                 f"not on model '{name}' ('{checkpoint.source}'): its config or tensors differ")

    def describe(self, state):
        return {"alpha": self.params.alpha, "statistics": self.params.statistics,
                "regmean_layers": len(state.get("linear", {}))}


def check_layer(weight, layer: dict, path: str, module: str, model: str) -> None:
    if weight.dim() != 2 or int(layer["features"]) != weight.shape[1]:
        raise InputError(f"statistics '{path}': the Gram of '{module}' is {layer['features']}x{layer['features']}, "
                         f"model '{model}' has a weight of shape {list(weight.shape)} there")
    if list(weight.shape) != layer["shape"]:
        return  # rows added to reconcile vocabularies (an LM head): the stored weight's digest does not apply
    if not stats.same_weight(weight, layer["weight_sum"], layer["weight_abs_sum"]):
        raise InputError(f"statistics '{path}': measured on another model than '{model}' (the weight of "
                         f"'{module}' differs from the one measured)")
