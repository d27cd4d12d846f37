"""The web console: server-rendered page shells under /console; their data comes from the /v1 API, called
from the browser with the API key the user signed in with (so the console can do exactly what the key can)."""
