# metatrain on the official PyTorch image (torch 2.9.1, CUDA 12.8, cuDNN 9); runs recipes with `accelerate launch`.
#
#   docker build -t metatrain .
#   docker run --rm --gpus all metatrain                          # recipes/noisy_labels.py on the embedded digits
#   docker run --rm --gpus all -v "$PWD/outputs:/workspace/metatrain/outputs" metatrain \
#       --num_processes 1 recipes/noisy_labels.py recipes/configs/noisy_labels_digits.yaml --seeds 0
# The CIFAR-10 config reads the dataset from the Hugging Face cache: mount it at /home/metatrain/.cache/huggingface.
FROM pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --gid 1001 metatrain \
    && useradd --create-home --no-log-init --shell /bin/bash --uid 1001 --gid 1001 metatrain

WORKDIR /workspace/metatrain
COPY --chown=1001:1001 . .

# torch comes with the base image: requiring exactly the installed distribution's version (its metadata version,
# which pip compares; `torch.__version__` may carry a local tag such as +cu128 that the metadata lacks) makes pip
# keep it, or fail loudly, instead of downloading another build. tests/test_docker.py runs this same command.
RUN pip install --no-cache-dir "./[recipes]" "torch==$(python -c 'from importlib.metadata import version; print(version("torch"))')"

USER 1001:1001
ENTRYPOINT ["accelerate", "launch"]
CMD ["recipes/noisy_labels.py"]
