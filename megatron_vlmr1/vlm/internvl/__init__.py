"""InternVL family (transformers-native ``InternVLForConditionalGeneration``): model, weights, prompt processing."""
