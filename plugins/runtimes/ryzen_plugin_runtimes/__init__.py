"""Ryzen plugin `runtimes`: the trained model converted to every installed inference engine
(CTranslate2, llama.cpp, OpenVINO, onnxruntime-genai), each run behind the core Backend protocol."""
