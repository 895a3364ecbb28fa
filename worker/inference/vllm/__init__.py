"""vLLM as a second inference engine: a Patchbay replica that runs vLLM's OpenAI server as its child.

vLLM lives in an environment of its own (its pins differ from ours), so this layer never imports it, nor
torch: `environment` finds that python and builds the child's environment, `process` starts and stops
vLLM's server, `service` brings adapters from our registry into it, `relay` forwards requests and
answers, `replica` is the replica's life in the fleet and `app` its HTTP face (`create_vllm_app`).
"""
