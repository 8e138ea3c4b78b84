# GPU host image: CUDA torch (+ torchvision, which Qwen2-VL/Qwen2.5-VL processors need), gunicorn on port 9090.
#   docker build -t mllm-backend .
#   docker run --gpus all -p 9090:9090 -v mllm-models:/data/models \
#     -e MLLM_MODEL=Qwen/Qwen2.5-VL-7B-Instruct -e LABEL_STUDIO_URL=http://label-studio:8080 \
#     -e LABEL_STUDIO_API_KEY=... mllm-backend
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    MODEL_DIR=/data/models \
    HF_HOME=/data/models/huggingface \
    PROMPTS_DIR=/app/prompts

WORKDIR /app
COPY pyproject.toml README.md ./
COPY backend ./backend
COPY prompts ./prompts
COPY label_config ./label_config
# The base image's CUDA torch satisfies the project's torch range, so pip keeps it.
RUN pip install .

VOLUME /data/models
EXPOSE 9090
# One gunicorn worker (one copy of the model on the GPU) with MAX_PREDICTS_IN_FLIGHT + 4 request threads.
CMD ["mllm-backend", "serve", "--host", "0.0.0.0", "--port", "9090"]
