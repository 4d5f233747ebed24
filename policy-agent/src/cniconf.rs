//! Rendering and atomic writing of the conflist (see ARCHITECTURE.md, "Conflist").
