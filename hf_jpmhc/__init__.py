"""hf_jpmhc — manifold-constrained hyper-connections (mHC, JPmHC and friends) for the Hugging Face stack.

Importing the package registers the JPmHC configs and models with the transformers Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from .models.configuration_hyper_connection import HyperConnectionConfig
from .models.configuration_jpmhc import JPmHCConfig
from .models.hyper_connection import HyperConnection, StreamCollapse
from .models.mixers import ALIASES, MIXERS, Mixer, build_mixer
from .models.modeling_jpmhc import JPmHCForCausalLM, JPmHCForSequenceClassification, JPmHCModel, JPmHCPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(JPmHCConfig.model_type, JPmHCConfig)
AutoModel.register(JPmHCConfig, JPmHCModel)
AutoModelForCausalLM.register(JPmHCConfig, JPmHCForCausalLM)
AutoModelForSequenceClassification.register(JPmHCConfig, JPmHCForSequenceClassification)

# save_pretrained writes auto_map and copies the code, so checkpoints load with trust_remote_code=True
# where hf_jpmhc is not installed.
JPmHCConfig.register_for_auto_class()
JPmHCModel.register_for_auto_class("AutoModel")
JPmHCForCausalLM.register_for_auto_class("AutoModelForCausalLM")
JPmHCForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "ALIASES",
    "MIXERS",
    "HyperConnection",
    "HyperConnectionConfig",
    "JPmHCConfig",
    "JPmHCForCausalLM",
    "JPmHCForSequenceClassification",
    "JPmHCModel",
    "JPmHCPreTrainedModel",
    "Mixer",
    "StreamCollapse",
    "build_mixer",
]
