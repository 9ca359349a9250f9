// The JavaScript twin of guests/hello-http: a wasi:http/proxy handler (StarlingMonkey's fetch
// event) that answers every request with a greeting and the path it was asked for. Built by
// scripts/build-large-guests.sh with componentize-js; its point is the size of the engine behind
// it, not what it does.
addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  event.respondWith(
    new Response(`hello from edged: ${url.pathname}${url.search}\n`, {
      headers: { "content-type": "text/plain" },
    }),
  );
});
