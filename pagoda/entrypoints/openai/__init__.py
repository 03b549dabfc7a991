"""OpenAI's dialect (completions, chat, its error shape, protocol models, the info routes)
and ``pagoda serve``'s app, which every dialect's routes are registered in (api_server.py)."""
