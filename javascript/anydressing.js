// Segment garment: a right-click on the photo adds a negative point.
// It switches the "Click adds" radio to "negative point", replays the click, and switches back;
// without this script the radio does the same by hand. Works in the WebUI and the standalone app.
(function () {
    function root() {
        return typeof gradioApp === "function" ? gradioApp() : document;
    }

    function attach() {
        const photo = root().querySelector("#anydressing_segment_photo");
        if (!photo || photo.dataset.anydressingRightClick) {
            return;
        }
        photo.dataset.anydressingRightClick = "1";
        photo.addEventListener("contextmenu", function (event) {
            const image = event.target.closest("img");
            const radios = Array.from(root().querySelectorAll("#anydressing_segment_mode input[type=radio]"));
            const negative = radios.find((radio) => radio.value === "negative point");
            if (!image || !negative) {
                return;
            }
            event.preventDefault();
            const previous = radios.find((radio) => radio.checked);
            negative.click();
            setTimeout(function () {
                const click = {bubbles: true, clientX: event.clientX, clientY: event.clientY};
                image.dispatchEvent(new MouseEvent("click", click));
                setTimeout(function () {
                    if (previous && previous !== negative) {
                        previous.click();
                    }
                }, 300);
            }, 100);
        });
    }

    if (typeof onUiUpdate === "function") {
        onUiUpdate(attach);
    } else {
        new MutationObserver(attach).observe(document, {childList: true, subtree: true});
        attach();
    }
})();
