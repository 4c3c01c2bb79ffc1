"""videollm: post-training for video large language models.

Importing the package registers the model, config and processor with transformers' Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

from videollm.data.processor import VideoLLMProcessor

from videollm.model.configuration import VideoLLMConfig
from videollm.model.modeling import VideoLLMForConditionalGeneration, VideoLLMModel

AutoConfig.register(VideoLLMConfig.model_type, VideoLLMConfig, exist_ok=True)
AutoModel.register(VideoLLMConfig, VideoLLMModel, exist_ok=True)
AutoModelForCausalLM.register(VideoLLMConfig, VideoLLMForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(VideoLLMConfig, VideoLLMForConditionalGeneration, exist_ok=True)
AutoProcessor.register(VideoLLMConfig, VideoLLMProcessor, exist_ok=True)

__all__ = ["VideoLLMConfig", "VideoLLMForConditionalGeneration", "VideoLLMModel", "VideoLLMProcessor"]
