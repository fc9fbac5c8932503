// The operator console's one script: the redrive buttons of the dead-letter view. The request
// is JSON, so another site cannot forge it with a form; the session cookie authenticates it.
document.addEventListener("click", async (event) => {
  const button = event.target.closest("button.redrive");
  if (!button) return;
  button.disabled = true;
  const response = await fetch("/api/dead-letters/redrive", {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({
      subscription: button.dataset.subscription,
      event_id: button.dataset.eventId,
    }),
  });
  if (response.ok) {
    button.closest("tr").classList.add("redriven");
    button.textContent = "redrive requested";
  } else {
    button.disabled = false;
    button.textContent = "failed (" + response.status + "), retry";
  }
});
