"""/v1/fine_tuning/jobs: OpenAI fine-tuning API proxied to the trainer."""
