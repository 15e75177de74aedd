// fleet-payouts support console: the only script, ours. Asks before an action that
// cannot be undone (buttons with data-confirm); without it the forms work as they are.
document.addEventListener("submit", function (event) {
  var button = event.submitter;
  var question = button && button.getAttribute("data-confirm");
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});
