"""hf_jpmhc — manifold-constrained hyper-connections (mHC, JPmHC and friends) for the Hugging Face stack.

Importing the package registers the JPmHC configs and models with the transformers Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
)

from .models.configuration_hyper_connection import HyperConnectionConfig
from .models.configuration_jpmhc import JPmHCConfig
from .models.configuration_jpmhc_vit import JPmHCViTConfig
from .models.hyper_connection import HyperConnection, StreamCollapse
from .models.mixers import ALIASES, MIXERS, Mixer, build_mixer
from .models.modeling_jpmhc import JPmHCForCausalLM, JPmHCForSequenceClassification, JPmHCModel, JPmHCPreTrainedModel
from .models.modeling_jpmhc_vit import JPmHCViTForImageClassification, JPmHCViTModel, JPmHCViTPreTrainedModel
from .conversion import convert_llama, convert_vit

__version__ = "0.1.0"

AutoConfig.register(JPmHCConfig.model_type, JPmHCConfig)
AutoModel.register(JPmHCConfig, JPmHCModel)
AutoModelForCausalLM.register(JPmHCConfig, JPmHCForCausalLM)
AutoModelForSequenceClassification.register(JPmHCConfig, JPmHCForSequenceClassification)
AutoConfig.register(JPmHCViTConfig.model_type, JPmHCViTConfig)
AutoModel.register(JPmHCViTConfig, JPmHCViTModel)
AutoModelForImageClassification.register(JPmHCViTConfig, JPmHCViTForImageClassification)

# save_pretrained writes auto_map and copies the code, so checkpoints load with trust_remote_code=True
# where hf_jpmhc is not installed.
JPmHCConfig.register_for_auto_class()
JPmHCModel.register_for_auto_class("AutoModel")
JPmHCForCausalLM.register_for_auto_class("AutoModelForCausalLM")
JPmHCForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
JPmHCViTConfig.register_for_auto_class()
JPmHCViTModel.register_for_auto_class("AutoModel")
JPmHCViTForImageClassification.register_for_auto_class("AutoModelForImageClassification")

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
    "JPmHCViTConfig",
    "JPmHCViTForImageClassification",
    "JPmHCViTModel",
    "JPmHCViTPreTrainedModel",
    "Mixer",
    "StreamCollapse",
    "build_mixer",
    "convert_llama",
    "convert_vit",
]
